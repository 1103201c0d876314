"""VQAv2 answer normalisation: one hand-made case per rule of the official script.

Each case is chosen so that it fails when its rule is removed or changed (noted per case).
"""

import pytest

from llava_train.eval.normalize import normalize_vqa_answer as norm
from llava_train.eval.normalize import process_digits_articles, process_punctuation

# The official punctuation list, written out here independently of the module's constant.
OFFICIAL_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip


@pytest.mark.parametrize("mark", OFFICIAL_PUNCTUATION)
def test_every_mark_between_letters_becomes_a_space(mark):
    # Fails if a mark is missing from the list (it would survive) or deleted instead of spaced.
    assert norm(f"red{mark}white") == "red white"


@pytest.mark.parametrize("mark", OFFICIAL_PUNCTUATION)
def test_every_mark_touching_a_space_is_deleted_everywhere(mark):
    # The mark touches a space once, so every occurrence is deleted, also the one between letters.
    assert norm(f"red{mark}white {mark}") == "redwhite"
    assert norm(f"{mark} red{mark}white") == "redwhite"


def test_comma_between_digits_switches_all_marks_to_deletion():
    assert norm("1,000") == "1000"  # spacing would give "1 000"
    assert norm("1,000 red-white") == "1000 redwhite"  # "-" deleted only because of "1,000"


def test_condition_reads_the_input_not_the_partial_output():
    # After ";" is replaced by a space, "x -" would appear, but the "-" test looks at the input.
    assert process_punctuation("a;-b") == "a  b"


def test_apostrophe_and_colon_are_not_punctuation():
    assert norm("don't") == "don't"
    assert norm("3:30") == "3:30"


def test_period_is_removed_unless_a_digit_follows():
    assert norm("yes.") == "yes"  # period rule removed -> "yes."
    assert norm("3.5") == "3.5"  # period always removed -> "35"
    assert norm("st. louis") == "st louis"


def test_period_removal_stops_after_32_like_the_official_re_sub_count():
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8


def test_newlines_and_tabs_become_spaces_before_punctuation():
    # Cleaned: "red-white- blue" has "- ", so "-" is deleted; uncleaned it would be spaced.
    assert norm("red-white-\nblue") == "redwhite blue"
    assert norm("\tred-white-\tblue\n") == "redwhite blue"


def test_lower_case_and_whitespace_collapse():
    assert norm("  Yes  ") == "yes"
    assert norm("Red   White") == "red white"


@pytest.mark.parametrize(
    ("word", "digit"),
    [("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
     ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10")],
)  # fmt: skip
def test_number_words_become_digits(word, digit):
    assert norm(word) == digit
    assert norm(f"{word.capitalize()} dogs") == f"{digit} dogs"


def test_number_words_past_ten_stay_words():
    assert norm("eleven") == "eleven"


@pytest.mark.parametrize("article", ["a", "an", "the", "A", "The"])
def test_articles_are_dropped_anywhere(article):
    assert norm(f"{article} cat on {article} mat") == "cat on mat"


def test_words_containing_articles_are_kept():
    assert norm("another theme") == "another theme"


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [("dont", "don't"), ("isnt", "isn't"), ("cant", "can't"), ("wont", "won't"), ("thats", "that's"),
     ("youre", "you're"), ("oclock", "o'clock"), ("twas", "'twas"), ("somebody'd", "somebodyd"),
     ("DONT", "don't")],
)  # fmt: skip
def test_contractions_table(raw, fixed):
    assert norm(raw) == fixed


def test_upper_case_contraction_keys_never_match_after_lower_casing():
    # The official table has "Im" -> "I'm", but words are lower-cased first.
    assert norm("Im") == "im"


def test_number_map_runs_before_article_drop_and_contractions_after():
    assert process_digits_articles("The two dont") == "2 don't"


def test_full_pipeline_example():
    assert norm('The answer is: "Two", I think.') == "answer is: 2 i think"
