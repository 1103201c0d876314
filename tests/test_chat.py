"""The terminal chat: eval's answer on the first turn, streamed, multi-turn, its commands, the real CLI."""

import io
import runpy
import sys
from pathlib import Path

import pytest
from test_serve_utils import MAX_TOKENS, QUESTIONS, make_images, make_model_dir

from llava_train.eval.generate import generate_answers
from llava_train.eval.questions import Question
from llava_train.serve.chat import ChatSession, run_terminal_chat
from llava_train.serve.generator import load_generator

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model_dir = make_model_dir(root)
    images = make_images(root / "images")
    generator = load_generator(str(model_dir))
    eval_answers = generate_answers(
        generator.model,
        generator.tokenizer,
        generator.image_processor,
        [Question(i, q, p.name) for i, (p, q) in enumerate(zip(images, QUESTIONS))],
        "chatml",
        max_new_tokens=MAX_TOKENS,
        image_folder=root / "images",
    )
    return dict(
        root=root,
        model_dir=model_dir,
        images=images,
        generator=generator,
        expected=[a["text"] for a in eval_answers],
    )


def test_first_answer_equals_eval_streamed_then_the_conversation_goes_on(setup):
    session = ChatSession(setup["generator"], str(setup["images"][0]), max_tokens=MAX_TOKENS)
    pieces = []
    first = session.reply(QUESTIONS[0], pieces.append)
    assert first == setup["expected"][0] and "".join(pieces) == first and len(pieces) > 1
    second = session.reply("Are you sure?")
    assert second and [role for role, _ in session.turns] == ["user", "assistant"] * 2
    assert session.turns[0][1] == f"<image>\n{QUESTIONS[0]}" and session.turns[2][1] == "Are you sure?"
    session.reset()
    assert session.reply(QUESTIONS[0]) == first  # a fresh conversation about the same image


def test_terminal_commands_switch_image_reset_and_quit(setup):
    images = setup["images"]
    lines = iter(
        [
            QUESTIONS[0],
            f"/image {images[1]}",
            QUESTIONS[1],
            "/reset",
            "/image /no/such.png",
            "/bogus",
            "",
            "/quit",
            "never read",
        ]
    )
    out = []
    run_terminal_chat(
        ChatSession(setup["generator"], str(images[0]), MAX_TOKENS), lambda _: next(lines), out.append
    )
    text = "".join(out)
    assert f"ASSISTANT: {setup['expected'][0]}\n" in text
    assert f"ASSISTANT: {setup['expected'][1]}\n" in text  # the second image, first turn: eval's answer
    assert f"(new conversation about {images[1]})" in text and "(conversation cleared)" in text
    assert "could not use that image: no image file at /no/such.png" in text and "unknown command" in text
    assert next(lines) == "never read"


def test_launch_chat_cli_streams_eval_answer(setup, monkeypatch, capsys):
    """launch/chat.py as ``python launch/chat.py ...`` runs it (Hydra included), in this process: a
    subprocess would spend most of its time importing torch again."""
    argv = [
        "launch/chat.py",
        f"model_dir={setup['model_dir']}",
        f"image={setup['images'][0]}",
        f"max_tokens={MAX_TOKENS}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n/quit\n"))
    monkeypatch.chdir(setup["root"])
    runpy.run_path(str(REPO / "launch" / "chat.py"), run_name="__main__")
    assert f"ASSISTANT: {setup['expected'][0]}\n" in capsys.readouterr().out
    assert not (setup["root"] / "outputs").exists()  # no Hydra output folder


def test_transformers_native_export_chats_like_the_checkpoint(setup, tmp_path):
    from llava_train.export import export_hf, load_original

    ours_dir = make_model_dir(tmp_path, image_aspect_ratio="pad", mm_patch_merge_type="flat")
    export_hf(load_original(ours_dir), setup["generator"].tokenizer, tmp_path / "native")
    image = str(setup["images"][2])
    ours = ChatSession(load_generator(str(ours_dir)), image, MAX_TOKENS).reply(QUESTIONS[2])
    native = ChatSession(load_generator(str(tmp_path / "native"), template="chatml"), image, MAX_TOKENS)
    assert native.reply(QUESTIONS[2]) == ours and ours
