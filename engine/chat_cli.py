"""Chat with a checkpoint in the terminal.

    python -m engine.chat_cli --checkpoint ~/.cache/nanochat/sft_checkpoints/d20
    python -m engine.chat_cli --checkpoint DIR -p "What is 12*34?"

With -p it answers once and exits; otherwise it keeps a conversation going (`clear` starts a
new one, `quit` or Ctrl-D leaves). Replies stream as they are generated; a calculator call
shows as `[python: 12*34 -> 408]`. Each reply gets a fresh random seed unless --seed is given,
as in the web chat.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from engine.checkpoint import load_model, load_tokenizer_for
from engine.engine import FINISHED, Engine, resolve_device
from engine.streaming import StreamDecoder
from engine.tokenizer import Tokenizer

_QUIT = {"quit", "exit"}
_CLEAR = "clear"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.chat_cli", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=50, help="0 = off")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one per reply")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, mps, cuda or cuda:N (N counts within CUDA_VISIBLE_DEVICES)",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="decode from captured CUDA graphs (CUDA only)"
    )
    return parser


class ReplyPrinter:
    """Streams one reply's tokens to `out` as readable text and rebuilds its message parts.

    Text goes through `StreamDecoder`; the tool tokens are shown as `[python: expr -> result]`
    instead of their special-token names, and the reply's parts (text / python /
    python_output) are collected so the conversation can continue from it.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO) -> None:
        self._tokenizer = tokenizer
        self._out = out
        self._decoder = StreamDecoder(tokenizer)
        special = tokenizer.encode_special
        # token -> (kind of the part it opens, what to show instead of its name)
        self._markers = {
            special("<|python_start|>"): ("python", "[python: "),
            special("<|python_end|>"): ("text", "]"),
            special("<|output_start|>"): ("python_output", "[output: "),
            special("<|output_end|>"): ("text", "]"),
        }
        self._stops = {tokenizer.get_bos_token_id(), special("<|assistant_end|>")}
        self._kind = "text"
        self._parts: list[dict[str, str]] = []
        self._text: list[str] = []

    def feed(self, token: int) -> bool:
        """Show one token; False once the reply has ended."""
        if token in self._stops:
            return False
        marker = self._markers.get(token)
        if marker is None:
            self._write(self._decoder.feed(token), keep=True)
            return True
        self._close_part()
        self._kind, shown = marker
        self._write(shown, keep=False)
        return True

    def finish(self) -> dict:
        """End the reply (newline) and return it as an assistant message."""
        self._close_part()
        # Cut off inside a tool call (max tokens): close the bracket.
        self._write("]\n" if self._kind != "text" else "\n", keep=False)
        parts = [part for part in self._parts if part["text"] or part["type"] != "text"]
        if all(part["type"] == "text" for part in parts):
            return {"role": "assistant", "content": "".join(part["text"] for part in parts)}
        return {"role": "assistant", "content": parts}

    def _close_part(self) -> None:
        self._write(self._decoder.flush(), keep=True)
        self._parts.append({"type": self._kind, "text": "".join(self._text)})
        self._text = []

    def _write(self, text: str, *, keep: bool) -> None:
        if text:
            if keep:
                self._text.append(text)
            self._out.write(text)
            self._out.flush()


def reply(
    engine: Engine,
    tokenizer: Tokenizer,
    messages: list[dict],
    args: argparse.Namespace,
    out: TextIO,
) -> dict:
    """Generate, stream and return the assistant's answer to `messages`."""
    prompt = tokenizer.render_for_completion({"messages": messages})
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    printer = ReplyPrinter(tokenizer, out)
    for column, _ in engine.generate(
        prompt,
        num_samples=1,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=seed,
    ):
        if column[0] == FINISHED or not printer.feed(column[0]):
            break
    return printer.finish()


def interactive(
    engine: Engine,
    tokenizer: Tokenizer,
    args: argparse.Namespace,
    read: Callable[[str], str],
    out: TextIO,
) -> None:
    out.write("Chat with the model: 'clear' starts over, 'quit' (or Ctrl-D) leaves.\n")
    messages: list[dict] = []
    while True:
        try:
            text = read("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if text.lower() in _QUIT:
            return
        if text.lower() == _CLEAR:
            messages = []
            out.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        out.write("Assistant: ")
        try:
            messages.append(reply(engine, tokenizer, messages, args, out))
        except ValueError as error:
            messages.pop()
            out.write(f"\n(error: {error}; type 'clear' to start a new conversation)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.top_k < 0:
        parser.error("--top-k must be >= 0 (0 = off)")
    try:
        device = resolve_device(args.device, "--device")
    except ValueError as error:
        parser.error(str(error))
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA --device, not {device}")
    try:
        model, _ = load_model(args.checkpoint, args.step, device=device)
        tokenizer = load_tokenizer_for(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    engine = Engine(model, tokenizer, cuda_graphs=args.cuda_graphs)
    if args.prompt is None:
        interactive(engine, tokenizer, args, input, sys.stdout)
        return 0
    try:
        reply(engine, tokenizer, [{"role": "user", "content": args.prompt}], args, sys.stdout)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
