"""Terminal chat with a loaded model: multi-turn, the reply printed as it is generated.

The image goes with the first user turn, as in training ("<image>\\n" + question); later turns are
text. ``/image PATH`` starts a new conversation about another image, ``/reset`` clears the
conversation (keeping the image), ``/quit`` (or end of input) leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data.errors import BadRecordError
from llava_train.data.image import load_image
from llava_train.serve.generator import Conversation, Generator, PromptError, SamplingParams

HELP = "commands: /image PATH (new conversation about PATH), /reset, /quit"


class ChatSession:
    """One conversation about (at most) one image."""

    def __init__(
        self, generator: Generator, image: str | None = None, max_tokens: int = 256, temperature: float = 0.0
    ):
        self.generator, self.max_tokens = generator, max_tokens
        self.params = SamplingParams(temperature=temperature)
        self.image = None
        self.turns: list[tuple[str, str]] = []
        if image:
            self.set_image(image)

    def set_image(self, path: str) -> None:
        """Talk about the image at ``path`` from now on (a new conversation); errors name the file."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no image file at {path}")
        self.image = load_image(path, background=self.generator.background)
        self.reset()

    def reset(self) -> None:
        self.turns = []

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to ``text`` after the conversation so far; ``on_text`` gets each piece."""
        first = not self.turns and self.image is not None
        user = f"{DEFAULT_IMAGE_TOKEN}\n{text}" if first else text
        images = [self.image] if self.image is not None else []
        turns = [*self.turns, ("user", user)]  # the image tag sits in the first user turn
        item = self.generator.prepare(Conversation(turns, images), self.max_tokens)
        emit = (lambda i, piece: on_text(piece)) if on_text else None
        answer = self.generator.generate([item], self.params, emit)[0].text
        self.turns = [*turns, ("assistant", answer)]
        return answer


def run_terminal_chat(
    session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] | None = None
) -> None:
    """The read-reply loop: lines from ``read``, pieces of the reply to ``write`` as they come."""
    write = write or (lambda s: print(s, end="", flush=True))
    write(HELP + "\n")
    while True:
        try:
            line = read("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                session.set_image(path)
                write(f"(new conversation about {path})\n")
            except (FileNotFoundError, BadRecordError) as err:
                write(f"(could not use that image: {err})\n")
            continue
        if line.startswith("/"):
            write(f"(unknown command; {HELP})\n")
            continue
        write("ASSISTANT: ")
        try:
            session.reply(line, write)
        except PromptError as err:
            write(f"(cannot answer: {err}; /reset starts over)")
        write("\n")
