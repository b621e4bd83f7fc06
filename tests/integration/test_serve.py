"""`zipmoe serve` live, on loopback, driven by the official openai client: one server (the CLI, Ray backend,
default settings but for --no-calibrate) for the whole module, stopped with SIGTERM at the end. Tokens are
checked against ZipMoEEngine.generate on the same prompt, or on the same batch for concurrent requests."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ray.serve")

from zipmoe_ray import ZipMoEEngine  # noqa: E402

MODEL = "tiny"
START_S = 300  # bound on the server's start-up (Ray, Serve, engine) on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny_stores, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "zipmoe_ray.cli.main", "serve", str(tiny_stores["qwen2_moe"])]
    cmd += ["--memory-budget", "25%", "--port", str(port), "--model-name", MODEL, "--no-calibrate"]
    cmd += ["--trace-out", "served.jsonl"]  # relative to the CLI's directory, not the replica's
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if _get(base + "/health", 2)[0] == 200:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"the server did not become healthy: {log.read_text()[-2000:]}")
        yield {"base": base, "proc": proc, "log": log, "trace": log.parent / "served.jsonl"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_stores):
    with ZipMoEEngine(
        tiny_stores["qwen2_moe"], memory_budget="25%", backend="local", num_decompressors=2, calibrate=False
    ) as e:
        yield e


def _extra(obj, name):
    return (obj.model_extra or {}).get(name)


def test_startup_prints_url_and_model(server):
    text = server["log"].read_text()
    assert f"model '{MODEL}' at {server['base']}/v1" in text


def test_completion_and_stream_equal_generate(client, reference):
    want = reference.generate("Rivers carry sand", 12)
    r = client.completions.create(
        model=MODEL,
        prompt="Rivers carry sand",
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert _extra(r.choices[0], "token_ids") == want.token_ids
    assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(reference.tokenizer("Rivers carry sand")["input_ids"])
    assert r.choices[0].finish_reason == ("stop" if len(want.token_ids) < 12 else "length")
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Rivers carry sand",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices


def test_chat_and_stream_equal_generate(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = reference.generate(ids, 8)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    s = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want.text


def test_eight_concurrent_streams_equal_generate_on_their_batches(client, reference):
    prompts = [f"Count {i} stones by the river" if i % 2 else f"Count {i}" for i in range(8)]

    def one(p):
        got, info = "", None
        s = client.completions.create(
            model=MODEL,
            prompt=p,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        for c in s:
            if c.choices:
                got += c.choices[0].text
                if c.choices[0].finish_reason:
                    info = (_extra(c.choices[0], "token_ids"), _extra(c.choices[0], "batch"))
        return p, got, info

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, prompts))
    batches: dict[str, dict[int, tuple]] = {}
    for p, text, (ids, where) in results:
        assert text == reference.tokenizer.decode(ids, skip_special_tokens=True)
        batches.setdefault(where["id"], {})[where["row"]] = (p, ids, where["size"])
    assert max(len(b) for b in batches.values()) > 1  # some requests were batched together
    for rows in batches.values():
        assert sorted(rows) == list(range(next(iter(rows.values()))[2]))  # every row of each batch is ours
        batch = [rows[r][0] for r in sorted(rows)]
        want = [o.token_ids for o in reference.generate(batch, 10)]
        assert [rows[r][1] for r in sorted(rows)] == want


def test_n_and_stop(client, reference):
    r = client.completions.create(model=MODEL, prompt="Rivers carry sand", max_tokens=6, temperature=0, n=2)
    want = reference.generate(["Rivers carry sand"] * 2, 6)
    assert [c.text for c in r.choices] == [o.text for o in want] and [c.index for c in r.choices] == [0, 1]
    full = reference.generate("Rivers carry sand", 12).text
    stop = full[4:6]
    r = client.completions.create(
        model=MODEL, prompt="Rivers carry sand", max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    url = server["base"] + "/v1/completions"
    chat = server["base"] + "/v1/chat/completions"
    long_prompt = list(range(2, 252))
    cases = [
        (chat, b'{"model": "tiny", "messages": [', 400, None),
        (url, b'{"model": "tiny", "prompt": "x", "max_tokens": "12"}', 400, "max_tokens"),
        (url, b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400, "stream"),
        (url, b'{"model": "other", "prompt": "x"}', 404, "model"),
        (
            url,
            json.dumps({"model": "tiny", "prompt": long_prompt, "max_tokens": 10}).encode(),
            400,
            "max_tokens",
        ),
        (url, b'{"model": "tiny", "prompt": "x", "n": 99}', 400, "n"),
        (url, b'{"model": "tiny", "prompt": [1, 999999]}', 400, "prompt"),
        (
            chat,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true}',
            400,
            "logprobs",
        ),
        (server["base"] + "/v1/embeddings", b"{}", 404, None),
    ]
    for target, body, status, param in cases:
        code, doc = _post(target, body)
        assert code == status, (body, doc)
        assert (
            set(doc["error"]) == {"message", "type", "param", "code"}
            and "Traceback" not in doc["error"]["message"]
        )
        assert doc["error"]["param"] == param
        if b'max_tokens": 10' in body:
            assert "256" in doc["error"]["message"] and "250" in doc["error"]["message"]
        r = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1


def _metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(_get(base + "/metrics")[1].decode()):
        for s in fam.samples:
            key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_a_client_that_goes_away_frees_its_slot(server, client):
    before = _metrics(server["base"])
    s = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=240, temperature=0, stream=True)
    seen = 0
    for c in s:
        seen += bool(c.choices and c.choices[0].text)
        if seen >= 2:
            break
    s.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = _metrics(server["base"])
        if m.get("zipmoe_requests_cancelled_total", 0) > before.get(
            "zipmoe_requests_cancelled_total", 0
        ) and not m.get("zipmoe_running_requests"):
            break
        time.sleep(0.2)
    generated = m["zipmoe_generation_tokens_total"] - before.get("zipmoe_generation_tokens_total", 0)
    assert m["zipmoe_requests_cancelled_total"] == before.get("zipmoe_requests_cancelled_total", 0) + 1
    assert 2 <= generated < 240  # its sequence stopped: the generation did not run to max_tokens
    r = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_the_routing_served_is_recorded_as_generate_records_it(server, client, tiny_stores, tmp_path):
    """--trace-out: one request per generation, the same steps and routing as ZipMoEEngine.generate records
    for the same prompt (what `zipmoe plan` and `zipmoe simulate` then take)."""
    from zipmoe_ray.trace.recorded import load_recorded

    def requests(path) -> dict[int, list]:
        out: dict[int, list] = {}
        for s in load_recorded(path).steps if path.exists() else ():
            out.setdefault(s.request, []).append((s.step, s.kind, s.batch, s.layers))
        return out

    before = set(requests(server["trace"]))
    client.completions.create(model=MODEL, prompt="Stones in the river", max_tokens=6, temperature=0)
    with ZipMoEEngine(
        tiny_stores["qwen2_moe"],
        memory_budget="25%",
        backend="local",
        calibrate=False,
        trace_path=tmp_path / "ref.jsonl",
    ) as e:
        n = len(e.generate("Stones in the river", 6).token_ids)
    want = requests(tmp_path / "ref.jsonl")[0]
    # the generations recorded since the request was sent: its own, and any that an earlier test's request (a
    # cancelled stream) ended meanwhile, since the module's server is shared; a generation is written when it
    # ends, which may be just after its last token reached the client
    deadline = time.monotonic() + 30
    while True:
        new = [steps for r, steps in requests(server["trace"]).items() if r not in before]
        if want in new or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(want) == n and want in new  # prefill then a decode step per token but the last
    assert [k for _, k, b, _ in want] == ["prefill"] + ["decode"] * (n - 1)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert _get(server["base"] + "/health")[0] == 200
    m = _metrics(server["base"])
    for name in (
        "zipmoe_requests_total",
        "zipmoe_generation_tokens_total",
        "zipmoe_time_to_first_token_seconds_count",
        "zipmoe_time_per_output_token_seconds_count",
        "zipmoe_batch_size_count",
        "zipmoe_queue_depth",
        "zipmoe_read_bytes_total",
    ):
        assert any(k.startswith(name) for k in m), name
    assert any(k.startswith('zipmoe_cache_hits_total{"form"') for k in m)


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped  # gRPC listens on dual-stack sockets: [::ffff:127.0.0.1]
    return a.is_loopback


def test_every_listener_of_the_server_is_on_loopback(server):
    """The server's process group (the CLI, Ray's head processes) and every descendant (Serve's proxy and
    replica, the engine's stage actors, Ray workers)."""
    root = psutil.Process(server["proc"].pid)
    procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(p.pid) == root.pid:
                procs[p.pid] = p
                procs.update((c.pid, c) for c in p.children(recursive=True))
    listening = []
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            listening += [
                (p.name(), c.laddr.ip, c.laddr.port)
                for c in p.net_connections("inet")
                if c.status == "LISTEN"
            ]
    port = int(server["base"].rsplit(":", 1)[1])
    assert any(lport == port for _, _, lport in listening)  # the HTTP proxy is among them
    assert [x for x in listening if not _loopback(x[1])] == []


def test_sigterm_stops_everything_it_started(server):
    """SIGTERM to the CLI alone (as `kill PID` or Ctrl-C would): it stops Serve and the Ray instance it
    started, so every process it had started is gone soon after."""
    proc = server["proc"]
    started = psutil.Process(proc.pid).children(recursive=True)
    assert started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    assert "zipmoe serve: stopped" in server["log"].read_text()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.5)
    assert [p.pid for p in alive] == []
