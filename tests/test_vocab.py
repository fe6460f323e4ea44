from captioning.text import clean_caption
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary


def test_clean_caption_rule():
    assert clean_caption("A dog's ball, in Washington D.C. !") == "a dog's ball in washington d c"
    assert clean_caption("  Two   DOGS .") == "two dogs"
    assert clean_caption('"Quoted"  text\t') == "quoted text"


def test_clean_caption_keeps_the_words_of_every_script():
    assert clean_caption("Un café près de l’église.") == "un café près de l'église"  # ’ is the apostrophe
    assert clean_caption("A cafe\u0301 .") == clean_caption("A café .") == "a café"  # decomposed = composed
    assert clean_caption("Ελληνικά, λόγια!") == "ελληνικά λόγια"
    assert clean_caption("हिन्दी भाषा") == "हिन्दी भाषा"  # vowel signs are combining marks, kept in their word
    assert clean_caption("snake_case ﬁsh — ok") == "snake case fish ok"  # "_" and dashes split, ligature unfolds


def test_vocabulary_order_min_count_and_specials():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<start>", "<end>"]
    assert vocab.itos[4:] == ["a", "dog"]  # by frequency, rare words dropped
    ids, truncated = vocab.encode("A dog flies.", max_length=10)
    assert ids == [START_ID, vocab.stoi["a"], vocab.stoi["dog"], UNK_ID, END_ID] and not truncated


def test_encode_all_pads_truncates_and_counts():
    vocab = Vocabulary.build(["one two three four"], min_count=1)
    matrix, truncated = vocab.encode_all(["one two three four", "one"], max_length=3)
    assert truncated == 1
    assert matrix.shape == (2, 5)
    one, two, three = (vocab.stoi[w] for w in ("one", "two", "three"))
    assert vocab.itos[4:] == ["four", "one", "three", "two"]  # equal counts: alphabetical
    assert list(matrix[0]) == [START_ID, one, two, three, END_ID]
    assert list(matrix[1]) == [START_ID, one, END_ID, PAD_ID, PAD_ID]


def test_decode_stops_at_end_and_skips_specials(tmp_path):
    vocab = Vocabulary.build(["red circle"], min_count=1)
    red, circle = vocab.stoi["red"], vocab.stoi["circle"]
    assert vocab.decode([START_ID, red, UNK_ID, circle, END_ID, red]) == "red circle"
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").itos == vocab.itos
