"""Incremental detokenization (split multi-byte characters) and stop strings across tokens."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lorafold.server.engine.detokenizer import IncrementalDetokenizer
from lorafold.server.engine.stop import StopChecker

SMOL = Path.home() / ".cache/lorafold/models/SmolLM2-135M-Instruct"
MULTIBYTE_TEXTS = [
    "Hello 😀 world",
    "日本語のテキスト、中文也行。",
    "naïve café 🤖🦙 done",
    "family: 👨‍👩‍👧 ok",
    "mixed 한국어 and Ελληνικά ✓",
]


@pytest.fixture(scope="module")
def smol():
    if not SMOL.exists():
        pytest.skip(f"{SMOL} missing; deploy/setup.sh fetches the default model")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOL))


class ByteTokenizer:
    """Tiny fake: token id = one byte (0-255); 256 = a special token."""

    SPECIAL = 256

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        out = b""
        for i in ids:
            if i == self.SPECIAL:
                out += b"" if skip_special_tokens else b"<eos>"
            else:
                out += bytes([i])
        return out.decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


# ---- the real SmolLM2 tokenizer ------------------------------------------------------------


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_smollm2_multibyte_never_split(smol, text: str) -> None:
    prompt = smol.encode("<|im_start|>user\nSay it<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = smol.encode(text, add_special_tokens=False)
    assert any("\ufffd" in smol.decode([i]) for i in ids), "the text must contain characters split over tokens"
    pieces = stream(IncrementalDetokenizer(smol, prompt), ids)
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == smol.decode(ids)
    assert "".join(pieces) == text


def test_smollm2_eos_is_hidden_unless_asked(smol) -> None:
    ids = smol.encode("Done.", add_special_tokens=False) + [smol.eos_token_id]
    assert "".join(stream(IncrementalDetokenizer(smol, [1]), ids)) == "Done."
    shown = "".join(stream(IncrementalDetokenizer(smol, [1], skip_special_tokens=False), ids))
    assert shown == "Done." + smol.eos_token


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The answer is 42. END of the story", ["answer is"], "The "),
        ("The answer is 42. END of the story", ["nothing", "2. END"], "The answer is 4"),
        ("robots 🤖🦙 llamas and more", ["🦙 ll"], "robots 🤖"),
        ("日本語のテキスト", ["のテ"], "日本語"),
        ("no stop here", ["xyz"], "no stop here"),
    ],
)
def test_smollm2_stop_strings_spanning_tokens(smol, text: str, stop: list[str], expected: str) -> None:
    ids = smol.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [1], stop=stop)
    pieces = []
    for n, i in enumerate(ids, 1):
        pieces.append(detok.add(i))
        if detok.finished:
            break
    pieces.append(detok.flush())
    assert "".join(pieces) == expected == detok.text
    if expected != text:
        assert detok.stop_string == stop[-1]
        assert all(stop[-1] not in smol.decode([i]) for i in ids), "the stop string must span tokens"
        # it was found at the very token that completed it, not later
        assert stop[-1] in smol.decode(ids[:n]) and stop[-1] not in smol.decode(ids[: n - 1])
        assert detok.add(ids[0]) == "" and detok.flush() == ""
    else:
        assert detok.stop_string is None


# ---- the tiny byte-level fake --------------------------------------------------------------


def test_fake_holds_incomplete_character_until_complete() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, tok.encode("hi "))
    emoji = "😀".encode()  # 4 bytes, 4 tokens
    assert [detok.add(b) for b in emoji] == ["", "", "", "😀"]
    assert detok.add(ord("!")) == "!"
    assert detok.text == "😀!"


def test_fake_flush_emits_an_incomplete_character_as_replacement() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [ord("a")])
    assert detok.add(ord("x")) == "x"
    assert detok.add("é".encode()[0]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_fake_special_token_skipped_then_text_continues() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [ord("a")])
    assert detok.add(ByteTokenizer.SPECIAL) == ""
    assert detok.add(ord("b")) == "b"


def test_fake_stop_prefix_held_then_released() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [ord(">")], stop=["END"])
    assert [detok.add(b) for b in tok.encode("xEN")] == ["x", "", ""]
    assert detok.add(ord("d")) == "ENd"  # not the stop string after all
    assert [detok.add(b) for b in tok.encode(" EN")] == [" ", "", ""]
    assert detok.flush() == "EN"  # the stream ended: the held prefix is just text
    assert detok.stop_string is None and detok.text == "xENd EN"


def test_fake_stop_after_multibyte_char_in_one_token_window() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [ord(">")], stop=["é!"])
    out = [detok.add(b) for b in "aé!b".encode()]
    assert "".join(out) == "a" and detok.stop_string == "é!"


class SentencePieceLikeTokenizer:
    """Fake with SentencePiece's habit: "▁" is a space, and a leading space is dropped."""

    VOCAB = ["Hello", "▁world", "▁again", "!"]

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        text = "".join(self.VOCAB[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_prompt_context_keeps_the_leading_space_of_the_first_token() -> None:
    detok = IncrementalDetokenizer(SentencePieceLikeTokenizer(), [0])
    assert [detok.add(i) for i in (1, 2, 3)] == [" world", " again", "!"]


# ---- StopChecker on its own ----------------------------------------------------------------


def reference_cut(text: str, stop: list[str]) -> tuple[str, str | None]:
    hits = [(text.find(s), i, s) for i, s in enumerate(stop) if s in text]
    if not hits:
        return text, None
    at, _, s = min(hits)
    return text[:at], s


def test_stop_overlapping_strings_earliest_start_wins() -> None:
    c = StopChecker(["abc", "b"])
    assert c.feed("xa").text == "x"
    assert c.feed("b").text == ""  # "b" matched but "abc" may still start earlier
    r = c.feed("c")
    assert r == type(r)("", "abc")
    c = StopChecker(["abc", "b"])
    assert c.feed("xab").text == "x"
    assert c.feed("z") == type(r)("a", "b")


def test_stop_match_found_at_flush() -> None:
    c = StopChecker(["abc", "b"])
    assert c.feed("ab").text == ""
    r = c.flush()
    assert (r.text, r.stop) == ("a", "b") and c.finished


def test_stop_checker_without_stops_passes_text_through() -> None:
    c = StopChecker([])
    assert c.feed("anything").text == "anything" and c.flush().text == ""
    with pytest.raises(ValueError):
        StopChecker([""])


@pytest.mark.parametrize("seed", range(20))
def test_stop_any_split_equals_one_shot(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abc😀"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    c = StopChecker(stop)
    pos, emitted, matched = 0, "", None
    while pos < len(text) and matched is None:
        step = rng.randint(0, 5)
        r = c.feed(text[pos : pos + step])
        emitted, matched, pos = emitted + r.text, r.stop, pos + step
    if matched is None:
        r = c.flush()
        emitted, matched = emitted + r.text, r.stop
    want_text, want_stop = reference_cut(text, stop)
    assert emitted == want_text
    assert (matched is None) == (want_stop is None)
    if matched is not None:
        assert text.find(matched) == len(want_text)
