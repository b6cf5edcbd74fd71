"""`orbit serve` over real HTTP: generation with logprobs, named adapters, errors, the CLI process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.rl.logprobs import token_logprobs
from orbit_core.rollout.serve import AdapterServer, make_http_server
from orbit_core.train import Callbacks, list_checkpoints, run_training
from tests.helpers import long_row, small_recipe


def call(url: str, path: str, body=None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("serve-run")
    recipe = small_recipe(root, tiny_checkpoint, train={"steps": 2, "lr": 5e-2}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    return root / "run"


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    server = AdapterServer(tiny_checkpoint, device="cpu", log=lambda m: None)
    http = make_http_server(server)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{http.server_address[1]}"
    http.shutdown()
    http.server_close()


def _fresh_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        return token_logprobs(model(ids[:, :-1]), ids[:, 1:])[0, len(prompt) - 1:]


def test_generate_returns_the_models_logprobs_with_and_without_an_adapter(served, trained_run, tiny_checkpoint):
    from orbit_core.config.schema import ModelSection, PeftSection
    from orbit_core.peft.base import load_adapter_state_dict
    from orbit_core.policy import build_policy, load_adapter

    server, url = served
    assert call(url, "/health") == (200, {"status": "ok"})
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    request = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 6, "temperature": 1.0}, "return_logprob": True}
    status, base_out = call(url, "/generate", request)
    assert status == 200 and len(base_out) == 2
    base = build_policy(ModelSection(path=tiny_checkpoint, device="cpu"), None, log=lambda m: None).model
    for prompt, out in zip(prompts, base_out):
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"]) > 0
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(got, _fresh_logprobs(base, prompt, out["output_ids"]), atol=2e-5, rtol=0)

    checkpoint = list_checkpoints(str(trained_run))[-1][1]
    assert call(url, "/load_lora_adapter", {"lora_name": "arith", "lora_path": str(trained_run)})[0] == 200
    status, tuned_out = call(url, "/generate", {**request, "lora_path": "arith"})
    assert status == 200
    state, meta = load_adapter(checkpoint)
    tuned = build_policy(ModelSection(path=tiny_checkpoint, device="cpu"), PeftSection(**meta["peft"]), log=lambda m: None).model
    load_adapter_state_dict(tuned, state)
    tuned.eval()  # the recipe trained with LoRA dropout; generation runs without it
    gaps = []
    for prompt, out in zip(prompts, tuned_out):
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
        torch.testing.assert_close(got, _fresh_logprobs(tuned, prompt, out["output_ids"]), atol=2e-5, rtol=0)
        gaps.append((got - _fresh_logprobs(base, prompt, out["output_ids"])).abs().max())
    assert max(gaps) > 1e-3  # the adapter really is in use
    status, again = call(url, "/generate", {**request, "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert status == 200  # without lora_path: the base model, adapter disabled
    for prompt, out in zip(prompts, again):
        got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]] or [0.0])
        if out["output_ids"]:
            want = torch.log_softmax(base(torch.tensor([prompt + out["output_ids"]]))[0, len(prompt) - 1:-1], -1)
            torch.testing.assert_close(got, want.gather(-1, torch.tensor(out["output_ids"])[:, None])[:, 0].detach(),
                                       atol=2e-5, rtol=0)


def test_bad_requests_get_a_status_and_a_reason(served, trained_run):
    _, url = served
    assert call(url, "/generate", {"input_ids": [[1, 2]], "lora_path": "nope"})[0] == 404
    status, body = call(url, "/generate", {"input_ids": [[1, 10**6]]})
    assert status == 400 and "outside" in body["error"]
    assert call(url, "/generate", {"sampling_params": {}})[0] == 400
    assert call(url, "/generate", b"{not json")[0] == 400
    assert call(url, "/generate", {"input_ids": [[1]], "sampling_params": {"top_p": 0}})[0] == 400
    status, body = call(url, "/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    assert status == 400 and "no adapter in" in body["error"]
    assert call(url, "/load_lora_adapter", {"lora_name": "tmp", "lora_path": str(trained_run)})[0] == 200
    assert call(url, "/unload_lora_adapter", {"lora_name": "tmp"})[0] == 200
    assert call(url, "/unload_lora_adapter", {"lora_name": "tmp"})[0] == 404
    context = served[0].model.config.max_position_embeddings
    status, body = call(url, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 10**9}})
    assert status == 400 and body["error"] == (f"a prompt of 3 tokens plus max_new_tokens=1000000000 exceeds the "
                                               f"model's context of {context} tokens (max_position_embeddings)")
    assert call(url, "/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": context - 3}})[0] == 200


def test_an_engine_failure_is_a_500_and_the_server_goes_on(served, monkeypatch):
    server, url = served
    real = server.engine.generate
    monkeypatch.setattr(server.engine, "generate", lambda *a, **k: (_ for _ in ()).throw(MemoryError("KV cache")))
    status, body = call(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert status == 500 and body == {"success": False, "error": "MemoryError: KV cache"}
    monkeypatch.setattr(server.engine, "generate", real)
    assert call(url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})[0] == 200
    assert call(url, "/generate", {"input_ids": [[1, 2]], "lora_path": "tmp"})[0] == 404
    assert call(url, "/flush_cache", {}) == (200, {"success": True})


def test_orbit_serve_cli_process(tiny_checkpoint, trained_run):
    process = subprocess.Popen([sys.executable, "-m", "orbit_cli.main", "serve", tiny_checkpoint, "--port", "0",
                                "--device", "cpu", "--adapter", str(trained_run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        line = process.stdout.readline()
        assert "serving" in line and "with adapter 'default'" in line, process.stderr.read() if not line else line
        url = line.split(" on ")[1].split()[0]
        assert call(url, "/health")[0] == 200
        status, out = call(url, "/generate", {"input_ids": [5, 6, 7], "lora_path": "default",
                                              "sampling_params": {"max_new_tokens": 3}})
        assert status == 200 and isinstance(out, dict) and out["meta_info"]["prompt_tokens"] == 3
    finally:
        process.terminate()
        process.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "orbit_cli.main", "serve", tiny_checkpoint, "--adapter", "/nowhere",
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no adapter in" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.count(" -- ") == 1, bad.stderr  # one fix, not the loader's and the command's


@contextlib.contextmanager
def serve_processes(checkpoint: str, count: int, processes: list | None = None):
    """``count`` ``orbit serve`` processes on free ports; yields their URLs, stops them on exit
    (``processes``, when given, receives their Popen objects)."""
    processes, urls = ([] if processes is None else processes), []
    try:
        for _ in range(count):
            processes.append(subprocess.Popen([sys.executable, "-m", "orbit_cli.main", "serve", checkpoint, "--port", "0",
                                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True, env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}))
        for process in processes:
            line = process.stdout.readline()
            assert "serving" in line, process.stderr.read()
            urls.append(line.split(" on ")[1].split()[0])
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def test_sglang_backend_trains_against_orbit_serve_processes(tmp_path, tiny_checkpoint):
    with serve_processes(tiny_checkpoint, 2) as urls:
        recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"backend": "sglang", "sglang_urls": urls},
                              train={"steps": 3, "save_rollouts": True}, eval={"enabled": False})
        result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert result.steps_done == 3
    for step, row in enumerate(result.metrics, start=1):
        # the servers sampled with the adapter the trainer had just published: its recompute matches
        assert row["rollout/behaviour_proximal_logprob_abs_diff_max"] < 1e-4
        assert row["staleness/max"] == 0 and row["sync/bytes"] > 0
        assert row["engine0/adapter_version"] == row["engine1/adapter_version"] == step
        assert row["engine0/tokens"] > 0 and row["engine1/tokens"] > 0  # both servers took prompts
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step_000003.jsonl").read_text().splitlines()]
    assert {r["adapter_version"] for r in rows} == {2}


def test_a_generate_longer_than_the_limit_waits_on_a_live_server_and_a_frozen_one_is_named(endless_checkpoint):
    """rollout.engine_timeout_s limits a server's silence, read on /health while /generate is out:
    a batch that decodes for three limits is waited for, and a frozen server (SIGSTOP) ends the
    wait with one line naming it."""
    import signal
    import time

    from orbit_core.errors import OrbitError
    from orbit_core.rollout.sglang_client import SGLangEngines
    from orbit_core.rollout.types import SamplingParams

    processes: list = []
    with serve_processes(endless_checkpoint, 1, processes) as urls:
        engines = SGLangEngines(urls, timeout_s=120)

        def generate(tokens: int):
            return engines.generate([[5, 6, 7]], SamplingParams(max_new_tokens=tokens, temperature=0.0))[0]

        done, took, tokens = long_row(generate)
        engines.servers[0].timeout_s = took / 3
        assert generate(tokens).token_ids == done.token_ids and engines.servers[0].health_answers > 0

        threading.Timer(took / 6, os.kill, (processes[0].pid, signal.SIGSTOP)).start()
        start = time.monotonic()
        try:
            with pytest.raises(OrbitError, match=r"left /health unanswered for .* s while generating"):
                generate(tokens)
            assert time.monotonic() - start < took / 6 + took / 3 + 5
        finally:
            os.kill(processes[0].pid, signal.SIGCONT)
        engines.close()


def test_sglang_backend_refusals(tmp_path, tiny_checkpoint):
    from orbit_core.errors import OrbitError

    recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"backend": "sglang"})
    with pytest.raises(OrbitError, match="needs running servers"):
        load_recipe(str(recipe))
    with pytest.raises(OrbitError, match="LoRA adapters only"):
        load_recipe(str(recipe), ["rollout.sglang_urls=[http://127.0.0.1:9]", "peft.method=oft"])
    recipe_ok = load_recipe(str(recipe), ["rollout.sglang_urls=[http://127.0.0.1:9]", "rollout.engine_timeout_s=5"])
    with pytest.raises(OrbitError, match="unreachable"):
        run_training(recipe_ok, Callbacks(on_message=lambda m: None))


def test_server_without_lora_is_named_with_the_missing_flag(tmp_path, tiny_checkpoint):
    """SGLang launched without --enable-lora answers a load with success=false and this message."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from orbit_core.errors import OrbitError

    class NoLora(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"success": False, "error_message": "LoRA is not enabled. Please set `--enable-lora` "
                                                                 "to enable LoRA."}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), NoLora)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}"
        recipe = load_recipe(str(small_recipe(tmp_path, tiny_checkpoint)), ["rollout.backend=sglang",
                                                                             f"rollout.sglang_urls=[{url}]"])
        with pytest.raises(OrbitError, match="has LoRA disabled") as err:
            run_training(recipe, Callbacks(on_message=lambda m: None))
        assert "--enable-lora" in err.value.fix
    finally:
        http.shutdown()
        http.server_close()
