"""The GGUF files Lemonade users have: one pull turns a file into a served model, and Gemma 3 270M (a second real
model, from its chunk packages) builds and decodes as og.Generator does on the same folder."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from lemonade_inferos.bench.servers import running_server
from lemonade_inferos.engine.build import BUILTIN_MODELS, CONVERTER, BuildSpec, build_model
from lemonade_inferos.engine.og_engine import OgEngine
from lemonade_inferos.engine.ort_engine import OrtEngine
from lemonade_inferos.engine.sampling import SamplingParams
from lemonade_inferos.engine.session import SessionPolicy
from tests.gguf_files import tiny_gguf

NAME = "user.Smol-From-GGUF"


def _greedy(engine, prompt: list[int], n: int = 16) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [t for chunk in engine.generate(prompt, params) for t in chunk.token_ids]


def _cli(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFEROS_HOME": str(home), "COLUMNS": "250", **(env or {})}
    return subprocess.run(["lemonade-server", *args], env=env, capture_output=True, text=True, timeout=1200)


def test_one_pull_turns_a_gguf_file_into_a_served_model(isolated_home, tmp_path):
    gguf = BUILTIN_MODELS["smollm2-135m"].locate()
    pulled = _cli("pull", NAME, "--checkpoint", str(gguf), home=isolated_home)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    info = json.loads((isolated_home / "user_models.json").read_text())[NAME]
    assert info["source"] == str(gguf) and info["recipe"] == "llamacpp"
    folder = Path(info["checkpoint"])
    assert folder.parent == isolated_home / "models"
    manifest = json.loads((folder / "inferos_build.json").read_text())
    assert manifest["spec"] == {"model": "user-smol-from-gguf", "weights": "int4", "kv": "fp32", "gguf": str(gguf)}
    assert NAME in _cli("list", home=isolated_home).stdout

    prompt = OrtEngine(folder).tokenizer.encode("The three primary colors are")
    ours = _greedy(OrtEngine(folder, SessionPolicy(devices=["cpu"])), prompt)
    assert ours == _greedy(OgEngine(folder), prompt)   # greedy output of the built folder matches og.Generator

    with running_server("--plugin", "inferos", env={"INFEROS_HOME": str(isolated_home)},
                        log_path=tmp_path / "server.log") as base:
        reply = httpx.post(f"{base}/api/v1/chat/completions", timeout=300, json={
            "model": NAME, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        models = httpx.get(f"{base}/api/v1/models", timeout=30).json()["data"]
        assert NAME in [m["id"] for m in models]

    again = _cli("pull", NAME, "--checkpoint", str(gguf), home=isolated_home)   # built and verified: not redone
    assert again.returncode == 0 and "already built and verified" in again.stdout + again.stderr


def test_gemma3_270m_builds_from_its_chunk_packages_and_decodes_as_og_generator_does():
    folder = build_model(BuildSpec("gemma3-270m", "int4"))   # the shared cache: built once
    ours = OrtEngine(folder, SessionPolicy(devices=["cpu"]))
    assert ours.folder.model_type == "gemma3_text" and ours.folder.sliding_window == 512
    prompt = ours.tokenizer.encode("The capital of France is", add_special=True)
    assert prompt[0] == ours.folder.bos_token_id   # Gemma's BOS, as llama.cpp adds it
    assert _greedy(ours, prompt) == _greedy(OgEngine(folder), prompt)

    live = OrtEngine(folder, SessionPolicy(devices=["cpu"], kv_cache="int8"))   # its INT8 live KV form runs too
    assert live.live_kv_report()["live_kv"] == "int8"
    assert len(_greedy(live, prompt)) == 16


def test_gemma3_ranks_blocks_by_attention_from_its_global_layers_in_either_live_form():
    """GroupQueryAttention returns no probabilities over a sliding window: the probes sit on global layers, and
    every layer's INT8 scales are bound though the probe switch hides two layers' attention."""
    from lemonade_inferos.eval.ppl import eval_ppl

    folder = build_model(BuildSpec("gemma3-270m", "int4"))
    probed = OrtEngine(folder, SessionPolicy(devices=["cpu"], kv_cache="int8", attention_probe=True))
    assert probed.probe_outputs and all(name.endswith((".5", ".11")) for name in probed.probe_outputs)
    rows = eval_ppl(probed, ["fp", "live8:dynamic"], context=256, recent_window=64)
    assert [row["plan"] for row in rows] == ["fp", "live8:dynamic"] and all(row["ppl"] > 1 for row in rows)


@pytest.mark.parametrize("arch, qtype", [("llama", "F32"), ("qwen2", "F32"), ("qwen3", "F32"), ("qwen2", "Q8_0"),
                                         ("phi3", "Q4_0"), ("gemma2", "Q8_0"), ("granite", "Q4_0")])
def test_a_gguf_of_each_architecture_builds_and_decodes_as_og_generator_does(arch, qtype, tmp_path):
    """Tiny random-weight GGUFs written as llama.cpp's converter writes them (``tests/gguf_files.py``; Phi-3's with
    fused QKV and gate/up matrices and an output matrix of its own, Gemma 2's with four norms a layer and a sliding
    window): one command from file to a folder, and the folder's greedy output is og.Generator's."""
    from lemonade_inferos.paths import inferos_home

    gguf = tiny_gguf(arch, BUILTIN_MODELS["smollm2-135m"].locate(), inferos_home() / "test-gguf", qtype,
                     tied=arch != "phi3")
    folder = build_model(BuildSpec(f"tiny-{arch}-{qtype.lower()}", "int4", gguf=str(gguf)))
    ours = OrtEngine(folder, SessionPolicy(devices=["cpu"]))
    assert ours.folder.num_layers == 2 and ours.folder.model_type == arch
    prompt = ours.tokenizer.encode(ours.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]))
    assert _greedy(ours, prompt) == _greedy(OgEngine(folder), prompt)


@pytest.mark.parametrize("arch", ["llama", "llama3", "granite", "phi3", "phi3-128k", "gemma2"])
def test_an_fp32_build_of_a_gguf_computes_what_the_model_it_was_written_from_computes(arch):
    """The file's metadata and extra tensors (Granite's four multipliers, Llama 3's RoPE frequency factors, Phi-3's
    LongRoPE factors and fused matrices, Gemma's norms stored +1) become the model it was written from: the fp32
    build's logits are transformers' on the original weights."""
    import numpy as np
    import torch

    from lemonade_inferos.paths import inferos_home
    from tests.gguf_files import tiny_model

    tied = not arch.startswith("phi3")
    gguf = tiny_gguf(arch, BUILTIN_MODELS["smollm2-135m"].locate(), inferos_home() / "test-gguf", tied=tied)
    ours = OrtEngine(build_model(BuildSpec(f"tiny-{arch}-f32", "fp32", gguf=str(gguf))),
                     SessionPolicy(devices=["cpu"]))
    # ~420 positions: Llama 3's rescaled frequencies turn too slowly to show over a few tokens
    prompt = ours.tokenizer.encode(" ".join(["Written from the model it came from."] * 60))
    with torch.no_grad():
        reference = tiny_model(arch, tied)(torch.tensor([prompt])).logits[0].numpy()
    logits = ours.forward(prompt, ours.new_cache())
    assert np.abs(logits - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())


@pytest.mark.parametrize("tied", [True, False])
def test_a_q4_0_files_blocks_are_the_built_models_weights_code_for_code(tied):
    """llama-quantize's Q4_0 blocks are MatMulNBits blocks: every matrix of the built folder, and its embedding
    table, dequantizes to exactly the file's weights (Llama's Q/K rows back in transformers' order, Q/K/V packed into
    one matrix; a tied output matrix is the embedding's blocks, an untied one's embedding is gathered from its own),
    and the manifest says so."""
    import numpy as np
    import onnx
    from gguf import GGUFReader
    from onnx.numpy_helper import to_array

    from lemonade_inferos.engine.gguf_grid import dequantized
    from lemonade_inferos.engine.gguf_weights import unpermuted_rows
    from lemonade_inferos.paths import inferos_home

    gguf = tiny_gguf("llama", BUILTIN_MODELS["smollm2-135m"].locate(), inferos_home() / "test-gguf", "Q4_0", tied)
    folder = build_model(BuildSpec(f"tiny-llama-q4_0{'' if tied else '-untied'}", "int4", gguf=str(gguf)))
    manifest = json.loads((folder / "inferos_build.json").read_text())
    assert manifest["converter"] == CONVERTER
    assert manifest["tensors"] == {"Q4_0 exact": 15 if tied else 16}

    source = {t.name: dequantized(t.data, t.tensor_type.name, (int(t.shape[1]), int(t.shape[0])))
              for t in GGUFReader(str(gguf)).tensors if len(t.shape) == 2}
    expected = {"/lm_head/MatMulNBits": source["token_embd.weight" if tied else "output.weight"]}
    for layer in range(2):
        q, k = (source[f"blk.{layer}.attn_{n}.weight"] for n in "qk")
        expected[f"/model/layers.{layer}/attn/qkv_proj/MatMulNBits"] = np.concatenate(
            [q[unpermuted_rows(64, 4)], k[unpermuted_rows(32, 2)], source[f"blk.{layer}.attn_v.weight"]])
        for onnx_name, gguf_name in (("attn/o_proj", "attn_output"), ("mlp/gate_proj", "ffn_gate"),
                                     ("mlp/up_proj", "ffn_up"), ("mlp/down_proj", "ffn_down")):
            expected[f"/model/layers.{layer}/{onnx_name}/MatMulNBits"] = source[f"blk.{layer}.{gguf_name}.weight"]

    model = onnx.load(str(folder / "model.onnx"))
    initializers = {i.name: to_array(i) for i in model.graph.initializer}
    assert "model.embed_tokens.weight" not in initializers   # no float table
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(n.name for n in nodes) == sorted(expected)
    for node in nodes:
        assert len(node.input) == 3, node.name   # Q4_0's zero point is the default: left out
        assert np.array_equal(_blocks_dequantized(*(initializers[name] for name in node.input[1:3])),
                              expected[node.name]), node.name
    if not tied:
        gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
        assert len(gather.input) == 3
        table, scales = (initializers[gather.input[i]] for i in (0, 2))
        assert np.array_equal(_blocks_dequantized(table.reshape(len(table), -1, 16), scales),
                              source["token_embd.weight"])
    ours = OrtEngine(folder, SessionPolicy(devices=["cpu"]))
    prompt = ours.tokenizer.encode("Blocks as they are")
    assert _greedy(ours, prompt) == _greedy(OgEngine(folder), prompt)

    # ONNX Runtime reads the blocks without zero points as the file means them: the logits are the fp32 build's
    # (the file's weights dequantized), but for the 8-bit activations MatMulNBits computes with
    floats = OrtEngine(build_model(BuildSpec(f"tiny-llama-q4_0{'' if tied else '-untied'}", "fp32", gguf=str(gguf))),
                       SessionPolicy(devices=["cpu"]))
    blocks, reference = (engine.forward(prompt, engine.new_cache()) for engine in (ours, floats))
    assert np.abs(blocks - reference).max() < 0.02 * np.abs(reference).max()
    assert np.array_equal(blocks.argmax(-1), reference.argmax(-1))


def _blocks_dequantized(packed, scales):
    """4-bit MatMulNBits/GatherBlockQuantized blocks [N, blocks, 16] without zero points (the default, 8) -> float32
    [N, K]."""
    import numpy as np

    from lemonade_inferos.engine.gguf_grid import unpack_codes

    rows = packed.shape[0]
    codes = unpack_codes(packed, 4).astype(np.float32)
    return ((codes - 8) * scales.reshape(rows, -1, 1)).reshape(rows, -1)


def test_pulling_a_registered_gguf_again_rebuilds_what_an_older_converter_made(isolated_home):
    from lemonade_inferos.paths import inferos_home

    tiny = tiny_gguf("qwen2", BUILTIN_MODELS["smollm2-135m"].locate(), inferos_home() / "test-gguf", "Q8_0")
    first = _cli("pull", "user.Tiny-Again", "--checkpoint", str(tiny), home=isolated_home)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest_path = isolated_home / "models" / "user-tiny-again-int4" / "inferos_build.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tensors"]["Q8_0 exact"] == 15
    manifest_path.write_text(json.dumps({**manifest, "converter": "transformers-fp32"}))   # as an older release left it
    again = _cli("pull", "user.Tiny-Again", home=isolated_home)   # no checkpoint: the registered file
    assert again.returncode == 0, again.stderr[-2000:]
    assert "built user-tiny-again-int4" in again.stdout + again.stderr
    assert json.loads(manifest_path.read_text())["converter"] == CONVERTER


def test_gguf_files_of_an_extra_models_dir_are_served_as_extra_models(isolated_home, tmp_path):
    """Lemonade's extra_models_dir: each GGUF there is extra.NAME, listed as downloaded and converted at its first
    load; /internal/set moves or clears the folder, and refuses a file."""
    from lemonade_inferos.paths import inferos_home

    shelf = tmp_path / "shelf"
    shelf.mkdir()
    tiny = tiny_gguf("qwen3", BUILTIN_MODELS["smollm2-135m"].locate(), inferos_home() / "test-gguf")
    (shelf / "Tiny-Qwen3-F32.gguf").symlink_to(tiny)
    (shelf / "mmproj-Tiny-F16.gguf").write_bytes(b"GGUF")   # a vision projector: not a model
    listed = _cli("list", home=isolated_home, env={"LEMONADE_EXTRA_MODELS_DIR": str(shelf)}).stdout
    assert "extra.Tiny-Qwen3-F32" in listed and "mmproj" not in listed
    with running_server("--plugin", "inferos", "--extra-models-dir", str(shelf),
                        env={"INFEROS_HOME": str(isolated_home)}, log_path=tmp_path / "server.log") as base:
        models = {m["id"]: m for m in httpx.get(f"{base}/api/v1/models", timeout=30).json()["data"]}
        assert models["extra.Tiny-Qwen3-F32"]["recipe"] == "llamacpp"
        reply = httpx.post(f"{base}/api/v1/completions", timeout=600, json={
            "model": "extra.Tiny-Qwen3-F32", "prompt": "Hello", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        assert (isolated_home / "models" / "extra-tiny-qwen3-f32-int4" / "inferos_build.json").is_file()
        refused = httpx.post(f"{base}/internal/set", json={"extra_models_dir": str(tiny)}, timeout=30)
        assert refused.status_code == 400 and "not a readable folder" in refused.text
        assert httpx.post(f"{base}/internal/set", json={"extra_models_dir": ""}, timeout=30).status_code == 200
        assert httpx.get(f"{base}/internal/config", timeout=30).json()["extra_models_dir"] == ""
        ids = [m["id"] for m in httpx.get(f"{base}/api/v1/models", timeout=30).json()["data"]]
        assert "extra.Tiny-Qwen3-F32" not in ids
