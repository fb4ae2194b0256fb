"""A real inference engine for the tests and benchmarks: llama.cpp's `llama-server` (built
by `make llama-server`) serving a tiny random-weight model that this module writes.

- `write_model`: a llama-architecture GGUF of random F16 weights (4 layers x width 128 by
  default, a 512-token SentencePiece-style vocabulary with all 256 byte tokens): a few MB,
  generated in well under a second, no download. It never emits its end token (see
  `write_model`): every request must name `max_tokens`, and gets exactly that many.
- `start_llama_server`: one server on a free port with one thread (`-t 1`: on a small
  machine more threads oversubscribe the cores under concurrency), `--parallel N` slots,
  chat and embeddings from one process, `/metrics` and `/slots`; ready once `/health`
  answers 200, stopped by PID.
- `busy_slots`: how many of its slots are processing now (`GET /slots`).

`python -m gpugate.testing.llama --port 8080` writes the model and runs llama-server on it
in the foreground (the README's mixed fleet for `make run`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from gpugate.testing.processes import ROOT, Process, free_port, start_http

EOS_ID = 2
DEFAULT_ALIAS = "tiny-llama"
"""The model name the server lists in /v1/models (it answers whatever `model` says)."""

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their has been if more when will would "
    "who so no can what out up said about other into than its time only could new them man "
    "some these then two first may any like now my such make over our even most me state after "
    "also made many did must before back see through way where get much go well your know "
    "should down work year because come people just say each those take day good how long "
    "little use world very still own last here thing give hand high great old life being "
    "under never same another know while might us house part found again place where gpu "
    "token model queue slot gate cache prompt"
).split()


def llama_server_binary() -> Path:
    """`GPUGATE_LLAMA_SERVER`, else the one `make llama-server` cached for the version the
    Makefile pins, else `llama-server` on PATH."""
    given = os.environ.get("GPUGATE_LLAMA_SERVER")
    if given:
        return Path(given)
    makefile = ROOT / "Makefile"
    if makefile.exists():
        found = re.search(r"^LLAMA_CPP_PYTHON := (\S+)$", makefile.read_text(), re.MULTILINE)
        if found:
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            binary = cache / "gpugate" / f"llama.cpp-{found.group(1)}" / "bin" / "llama-server"
            if binary.exists():
                return binary
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("llama-server is not built: run `make llama-server` (once a machine)")


@dataclass(frozen=True)
class ModelShape:
    layers: int = 4
    width: int = 128
    heads: int = 4
    kv_heads: int = 4
    feed_forward: int = 256
    vocab: int = 512
    context: int = 32768
    """What the model says it was trained for: the most a server may give one slot."""

    @property
    def head_size(self) -> int:
        return self.width // self.heads


def _vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style pieces: <unk>, <s>, </s>, the 256 byte tokens, then word pieces
    (`▁word`), single characters and `▁` up to `size`."""
    import gguf

    types = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    kinds = [types.UNKNOWN, types.CONTROL, types.CONTROL] + [types.BYTE] * 256
    pieces: list[str] = ["\u2581"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += list("0123456789.,!?;:'\"()-")
    pieces += ["\u2581" + w for w in dict.fromkeys(_WORDS)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [a + b for a in "etaoinshr" for b in "etaoinshr"]
    for piece in dict.fromkeys(pieces):
        if len(tokens) >= size:
            break
        tokens.append(piece)
        kinds.append(types.NORMAL)
    if len(tokens) < size:
        raise ValueError(f"a vocabulary of {size} needs more pieces than {len(tokens)}")
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, [int(k) for k in kinds]


def write_model(path: Path, shape: ModelShape = ModelShape(), seed: int = 0) -> Path:
    """Write a llama GGUF of random F16 weights to `path` (the keys llama.cpp insists on:
    context, embedding and feed-forward lengths, block and head counts, the RMS norm
    epsilon, rope dimensions = the head size, the tokenizer and its tokens).

    Random weights would sample the end token now and then (about once in 500 tokens),
    ending a request early at random. So one dimension of every token's embedding is a
    constant that dominates the residual stream, and only the end token's output row
    reads it, negatively: its logit is always the lowest, outside any top-k, and a
    request generates exactly its `max_tokens`."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    arch = "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("gpugate tiny random llama")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.width)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_size)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, kinds = _vocabulary(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(shape.width, dtype=np.float32)

    kv_width = shape.kv_heads * shape.head_size
    embeddings = matrix(shape.vocab, shape.width)
    embeddings[:, 0] = 1.0
    output = matrix(shape.vocab, shape.width)
    output[:, 0] = 0.0
    output[EOS_ID, 0] = -1.0
    writer.add_tensor("token_embd.weight", embeddings)
    for i in range(shape.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(shape.width, shape.width))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_width, shape.width))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_width, shape.width))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(shape.width, shape.width))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(shape.feed_forward, shape.width))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(shape.feed_forward, shape.width))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(shape.width, shape.feed_forward))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def start_llama_server(
    model: Path,
    *,
    parallel: int = 2,
    context_per_slot: int = 2048,
    alias: str = DEFAULT_ALIAS,
    port: int | None = None,
    api_key: str | None = None,
    timeout: float = 60.0,
) -> Process:
    """One llama-server for `model`: `parallel` slots, chat and embeddings (mean pooling),
    `/metrics`, `/slots`; returned once `/health` answers 200. Its HTTP threads are many
    more than its slots: each open connection holds one (keep-alive ones too), and a
    gateway's pool, a cap above the slots and a test polling `/slots` must all get in.
    `port`: a given one (to restart a server where the gate expects it), else a free one."""
    port = port or free_port()
    argv = llama_server_argv(model, port, parallel, context_per_slot, alias, api_key)
    proc = start_http(
        f"llama-server-{port}", argv, port, "/health", status=200, timeout=timeout, interval=0.05
    )
    proc.extra["alias"] = alias
    return proc


def llama_server_argv(
    model: Path,
    port: int,
    parallel: int,
    context_per_slot: int = 2048,
    alias: str = DEFAULT_ALIAS,
    api_key: str | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    argv = [
        str(llama_server_binary()),
        "--model", str(model),
        "--alias", alias,
        "--host", host,
        "--port", str(port),
        "--threads", "1",
        "--threads-http", str(parallel + 16),
        "--parallel", str(parallel),
        "--ctx-size", str(context_per_slot * parallel),
        "--embeddings",
        "--pooling", "mean",
        "--metrics",
        "--slots",
        "--no-webui",
    ]  # fmt: skip
    if api_key:
        argv += ["--api-key", api_key]
    return argv


def slots(proc: Process, api_key: str | None = None) -> list[dict[str, object]]:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    answer = httpx.get(proc.url + "/slots", headers=headers, timeout=5.0)
    answer.raise_for_status()
    return list(answer.json())


def busy_slots(proc: Process, api_key: str | None = None) -> int:
    """Slots processing a request now (`GET /slots`, `is_processing`)."""
    return sum(1 for slot in slots(proc, api_key) if slot.get("is_processing"))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gpugate.testing.llama",
        description="llama-server on a tiny random-weight model, in the foreground",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--alias", default=DEFAULT_ALIAS)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    model = write_model(Path(tempfile.mkdtemp(prefix="gpugate-llama-")) / "tiny-llama.gguf")
    argv = llama_server_argv(
        model, args.port, args.parallel, alias=args.alias, api_key=args.api_key, host=args.host
    )
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
