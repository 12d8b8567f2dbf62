"""launch_server's flags: SGLang's names and aliases map onto EngineConfig; what is not built stops start-up
with exit status 2 and a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from radixserve import launch_server
from radixserve.errors import UnsupportedFeatureError
from radixserve.launch_server import engine_config, parse_args, read_chat_template

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def test_flags_map_onto_engine_config() -> None:
    args = parse_args(
        [
            "--model-path",
            "/models/x",
            "--served-model-name",
            "x",
            "--tp",
            "2",
            "--dp",
            "1",
            "--max-num-reqs",
            "7",
            "--max-queued-requests",
            "3",
            "--context-length",
            "1024",
            "--chunked-prefill-size",
            "256",
            "--max-prefill-tokens",
            "512",
            "--max-total-tokens",
            "4096",
            "--schedule-policy",
            "fcfs",
            "--disable-radix-cache",
            "--disable-cuda-graph",
            "--cuda-graph-max-bs",
            "8",
            "--dtype",
            "float32",
            "--random-seed",
            "5",
            "--log-requests",
            "--device",
            "cpu",
            "--mem-fraction-static",
            "0.5",
            "--kv-cache-dtype",
            "fp8_e5m2",
            "--enable-flashinfer-allreduce-fusion",
        ]
    )
    cfg = engine_config(args)
    assert (cfg.model_path, cfg.served_model_name, cfg.tp_size, cfg.dp_size) == ("/models/x", "x", 2, 1)
    assert cfg.enable_flashinfer_allreduce_fusion
    assert (cfg.max_running_requests, cfg.max_queued_requests, cfg.context_length) == (7, 3, 1024)
    assert (cfg.chunked_prefill_size, cfg.max_prefill_tokens, cfg.max_total_tokens) == (256, 512, 4096)
    assert cfg.schedule_policy == "fcfs" and cfg.disable_radix_cache and cfg.disable_cuda_graph
    assert (cfg.cuda_graph_max_bs, cfg.dtype, cfg.random_seed, cfg.device) == (8, "float32", 5, "cpu")
    assert cfg.log_requests and cfg.mem_fraction_static == 0.5 and cfg.kv_cache_dtype == "fp8_e5m2"
    defaults = parse_args([])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 30000)
    assert engine_config(defaults).model_path is None  # the default model


def test_chat_template_file_or_string(tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert read_chat_template(str(path)) == TEMPLATE
    assert read_chat_template(TEMPLATE) == TEMPLATE
    assert engine_config(parse_args(["--chat-template", str(path)])).chat_template == TEMPLATE
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template("no-such-template.jinja")


def test_unbuilt_feature_exits_2_with_its_message(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Whatever EngineConfig refuses as not built (tp > 1, a quantization, ...) ends start-up the same way."""

    def refuse(**kwargs: object) -> None:
        raise UnsupportedFeatureError("--frobnicate is not built yet")

    monkeypatch.setattr(launch_server, "EngineConfig", refuse)
    with pytest.raises(SystemExit) as exit_info:
        launch_server.main(["--port", "0"])
    assert exit_info.value.code == 2
    assert "--frobnicate is not built yet" in capsys.readouterr().err


def test_bad_flags_exit_2_without_a_traceback() -> None:
    for flags in (["--dtype", "int3"], ["--quantization", "no-such-method"], ["--no-such-flag"],
                  ["--kv-cache-dtype", "int4"]):
        proc = subprocess.run(
            [sys.executable, "-m", "radixserve.launch_server", *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (flags, proc.stderr)
        assert flags[0][2:] in proc.stderr and "Traceback" not in proc.stderr


def test_allreduce_fusion_needs_tensor_parallelism_on_one_host() -> None:
    from radixserve.config import EngineConfig

    for kw in ({}, {"tp_size": 2, "nnodes": 2, "dist_init_addr": "127.0.0.1:5000"}):
        with pytest.raises(ValueError, match="needs tp_size > 1 and nnodes 1"):
            EngineConfig(enable_flashinfer_allreduce_fusion=True, **kw)


def test_engine_config_names_a_bad_kv_cache_dtype() -> None:
    from radixserve.config import EngineConfig

    message = "kv_cache_dtype must be one of auto, fp8_e5m2, fp8_e4m3; got 'int8'"
    with pytest.raises(ValueError, match=message):
        EngineConfig(kv_cache_dtype="int8")
