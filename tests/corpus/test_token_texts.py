"""corpus.token_texts: a text for every row of the unembedding."""

from sparse_coding.corpus import token_texts


class _Tokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(self.pieces[i] for i in ids)


def test_token_texts_name_the_padded_unembedding_rows():
    # Pythia's unembedding has 50304 rows for 50277 tokens; a logit lens or an ablation can rank a padded id, and
    # notebook 06 failed with IndexError on the real model when one did.
    texts = token_texts(_Tokenizer(["a", " b", "\n", "\x07"]), n_vocab=6)
    assert texts == ["a", "·b", "⏎", "\\x07", "⟨id 4⟩", "⟨id 5⟩"]
    assert token_texts(_Tokenizer(["a"])) == ["a"]
