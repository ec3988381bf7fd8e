"""Pool generation: the hf engine (batched, byte-deterministic), the openai engine against a
local test server (retries, failed rows, resume), the vllm install hint, and bad input."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from karma.core.errors import KarmaError
from karma.generation.generate import PROMPT_SCHEMA, SCHEMA, generate_all, select_prompts
from karma.generation.settings import GenerateConfig, PoolModel

REPO = Path(__file__).resolve().parents[1]
PROMPTS = pl.DataFrame(
    {
        "prompt_id": [f"p{i}" for i in range(5)],
        "prompt": [
            "What is the capital of France?",
            "Name a color.",
            "Count to three.",
            "Write one word about water.",
            "Say hello to the city of Rome and Paris.",
        ],
    }
)


def _hf(tiny: Path, **kw: Any) -> tuple[PoolModel, GenerateConfig]:
    return PoolModel(model=str(tiny)), GenerateConfig(max_new_tokens=12, batch_size=2, **kw)


def _bytes(frame: pl.DataFrame, path: Path) -> bytes:
    frame.write_parquet(path, statistics=False)
    return path.read_bytes()


def test_hf_rows_and_byte_identical_reruns(tiny_model_dir: Path, tmp_path: Path) -> None:
    entry, cfg = _hf(tiny_model_dir)
    a = generate_all(entry, cfg, PROMPTS, "tiny")
    b = generate_all(entry, cfg, PROMPTS, "tiny")
    assert a.schema == pl.Schema(SCHEMA) and a.height == 5
    assert _bytes(a, tmp_path / "a.parquet") == _bytes(b, tmp_path / "b.parquet")
    ok = a.filter(pl.col("tokens") > 0)
    assert ok.height == 5 and (a["tokens"] <= 12).all()
    assert ((ok["logprob_sum"] / ok["tokens"] - ok["logprob_mean"]).abs() < 1e-9).all()
    assert (a["logprob_sum"] < 0).all() and set(a["finish_reason"]) <= {"stop", "length"}
    assert a["engine"][0] == "hf" and "transformers" in a["engine_version"][0]
    # seeded sampling, n = 2: identical across reruns, different from greedy
    entry, cfg = _hf(tiny_model_dir, temperature=1.0, n=2, seed=3)
    s1, s2 = (generate_all(entry, cfg, PROMPTS, "tiny") for _ in range(2))
    assert s1.height == 10 and s1["sample"].to_list()[:2] == [0, 1]
    assert _bytes(s1, tmp_path / "s1.parquet") == _bytes(s2, tmp_path / "s2.parquet")
    assert s1.filter(pl.col("sample") == 0)["text"].to_list() != a["text"].to_list()


def test_hf_greedy_logprob_is_the_models_own(tiny_model_dir: Path) -> None:
    """The summed log-probability equals a separate forward pass over prompt + completion."""
    import torch

    from karma.generation.engines import HFEngine

    entry, cfg = _hf(tiny_model_dir)
    eng = HFEngine(entry, cfg)
    ((c,),) = eng.generate([[{"role": "user", "content": PROMPTS["prompt"][0]}]], 0)
    enc = eng.encode([[{"role": "user", "content": PROMPTS["prompt"][0]}]])
    out = eng.model.generate(
        **enc, max_new_tokens=12, do_sample=False, pad_token_id=eng.tok.pad_token_id
    )
    new = out[0, enc["input_ids"].shape[1] :][: c.tokens]
    full = torch.cat([enc["input_ids"][0], new])[None]
    with torch.no_grad():
        logp = torch.log_softmax(eng.model(full).logits[0, :-1].float(), -1)
    n = enc["input_ids"].shape[1]
    want = logp[n - 1 :].gather(-1, full[0, n:, None])[:, 0].sum()
    assert abs(float(want) - c.logprob_sum) < 1e-3


def test_prompts_seeded_sample_distinct_and_empty() -> None:
    frame = pl.DataFrame({"prompt": ["a", "b", "a", " ", "c", "d", "e"]})
    one, again = (select_prompts(frame, 3, 7, "x") for _ in range(2))
    assert one.equals(again) and one.height == 3 and one["prompt"].n_unique() == 3
    assert select_prompts(frame, None, 0, "x")["prompt"].to_list() == ["a", "b", "c", "d", "e"]
    with pytest.raises(KarmaError, match="empty prompt set"):
        select_prompts(pl.DataFrame({"prompt": ["  "]}), None, 0, "file.jsonl")


# --------------------------------------------------------------------------- openai


class Server:
    """A local OpenAI-compatible test server: scripted statuses, then echo completions."""

    def __init__(self, script: list[int] | None = None, fail_after: int | None = None):
        self.script = list(script or [])
        self.fail_after = fail_after
        self.calls = 0
        self.keys: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"data": [{"id": "m"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.keys.append(self.headers.get("Authorization"))
                owner.calls += 1
                code = owner.script.pop(0) if owner.script else 200
                if owner.fail_after is not None and owner.calls > owner.fail_after:
                    code = 503
                if code != 200:
                    self._send(code, {"error": "scripted"})
                    return
                text = "echo: " + body["messages"][-1]["content"]
                lps = [{"token": w, "logprob": -0.5} for w in text.split()]
                self._send(
                    200,
                    {
                        "choices": [
                            {
                                "index": k,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                                "logprobs": {"content": lps},
                            }
                            for k in range(body["n"])
                        ]
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Any]:
    made: list[Server] = []

    def make(**kw: Any) -> Server:
        made.append(Server(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _oa(url: str, **kw: Any) -> tuple[PoolModel, GenerateConfig]:
    cfg = GenerateConfig(
        engine="openai", base_url=url, backoff=0.01, batch_size=2, concurrency=2, **kw
    )
    return PoolModel(model="served"), cfg


def test_openai_rows_retries_and_key_from_env(server: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("KARMA_TEST_KEY", "sk-test")
    s = server(script=[429, 500])
    entry, cfg = _oa(s.url, api_key_env="KARMA_TEST_KEY", n=2)
    frame = generate_all(entry, cfg, PROMPTS, "srv")
    assert frame.height == 10 and (frame["status"] == "ok").all()
    assert frame["text"][0] == "echo: " + PROMPTS["prompt"][0]
    assert frame["tokens"][0] == len(frame["text"][0].split())
    assert frame["logprob_mean"][0] == pytest.approx(-0.5)
    assert s.calls == 5 + 2  # two retried
    assert set(s.keys) == {"Bearer sk-test"}


def test_openai_failed_rows_marked_then_resumed(server: Any, tmp_path: Path) -> None:
    s = server(fail_after=2)  # a server that fails mid-run
    entry, cfg = _oa(s.url, retries=1)
    first = generate_all(entry, cfg, PROMPTS, "srv", resume=tmp_path)
    assert first.height == 5  # failed rows are kept, marked
    assert first["status"].to_list() == ["ok", "ok", "failed", "failed", "failed"]
    assert first.filter(pl.col("status") == "failed")["error"][0] == "HTTP 503"
    good = server()
    entry, cfg = _oa(good.url, retries=1)
    second = generate_all(entry, cfg, PROMPTS, "srv", resume=tmp_path)
    assert (second["status"] == "ok").all() and good.calls == 3  # the finished batch reused
    assert second.head(2).equals(first.head(2))


def test_openai_missing_key_and_unreachable_server(monkeypatch: Any) -> None:
    monkeypatch.delenv("KARMA_TEST_KEY", raising=False)
    entry, cfg = _oa("https://api.example.invalid/v1", api_key_env="KARMA_TEST_KEY")
    with pytest.raises(KarmaError, match="missing API key: environment variable KARMA_TEST_KEY"):
        generate_all(entry, cfg, PROMPTS, "srv")
    entry, cfg = _oa("http://127.0.0.1:9/v1")
    with pytest.raises(KarmaError, match="server unreachable"):
        generate_all(entry, cfg, PROMPTS, "srv")


def test_vllm_is_never_imported_on_cpu_and_says_how_to_install(monkeypatch: Any) -> None:
    import karma.generation.generate  # noqa: F401

    assert "vllm" not in sys.modules
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    entry = PoolModel(model="x")
    with pytest.raises(KarmaError, match=r"vllm is not installed.*pip install"):
        generate_all(entry, GenerateConfig(engine="vllm"), PROMPTS, "v")


# --------------------------------------------------------------------------- stage, bad input


def _prompts_file(tmp_path: Path, prompts: list[str]) -> Path:
    f = tmp_path / "prompts.parquet"
    f.parent.mkdir(parents=True, exist_ok=True)
    ids = [str(i) for i in range(len(prompts))]
    pl.DataFrame({"prompt_id": ids, "prompt": prompts}, schema=PROMPT_SCHEMA).write_parquet(f)
    return f


def test_generate_stage_and_bad_input(karma_cli: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.fixtures import error_line

    prompts = _prompts_file(tmp_path, ["Name a color.", "Count to two."])
    pool = f"scores.measured={{tiny: {{model: {tiny_model_dir}, modes: [pool]}}}}"
    base = ["generate", "--prompts", str(prompts), "-S", pool, "-S", "generate.max_new_tokens=4"]
    out = tmp_path / "g.parquet"
    # dataset mode: an empty table, no model loaded
    code, _, err = karma_cli(*base, "--name", "tiny", "--out", str(out))
    assert code == 0 and pl.read_parquet(out).height == 0
    code, _, err = karma_cli(*base, "-S", "completions=pool", "--name", "tiny", "--out", str(out))
    assert code == 0, err
    assert pl.read_parquet(out).height == 2
    kept = out.read_bytes()
    code, _, err = karma_cli(*base, "-S", "completions=pool", "--name", "tinyy", "--out", str(out))
    assert "unknown pool model; did you mean 'tiny'?" in error_line(code, err, logs_before=True)
    code, _, err = karma_cli(*base, "-S", "generate.n=0", "--name", "tiny", "--out", str(out))
    assert error_line(code, err) == "-S generate.n: out of range (got 0; expected 1 <= n)"
    empty = _prompts_file(tmp_path / "e", [])
    code, _, err = karma_cli(
        "generate",
        "--prompts",
        str(empty),
        "-S",
        pool,
        "-S",
        "completions=pool",
        "--name",
        "tiny",
        "--out",
        str(out),
    )
    assert "empty prompt set" in error_line(code, err, logs_before=True)
    assert out.read_bytes() == kept  # earlier outputs kept


def test_model_without_chat_template_is_one_line(
    karma_cli: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.fixtures import error_line

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for f in bare.glob("*"):
        if f.name == "chat_template.jinja":
            f.unlink()
        elif f.name == "tokenizer_config.json":
            data = json.loads(f.read_text())
            data.pop("chat_template", None)
            f.write_text(json.dumps(data))
    prompts = _prompts_file(tmp_path, ["Name a color."])
    code, _, err = karma_cli(
        "generate",
        "--prompts",
        str(prompts),
        "--name",
        "bare",
        "--out",
        str(tmp_path / "o.parquet"),
        "-S",
        f"scores.measured={{bare: {{model: {bare}}}}}",
        "-S",
        "completions=pool",
    )
    line = error_line(code, err, logs_before=True)
    assert "scores.measured: field 'bare.chat_template'" in line and "no chat template" in line


# --------------------------------------------------------------------------- DVC: one pool


def _resolve(text: str, key: str, params: dict[str, Any]) -> str:
    import re

    import yaml

    paths = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]["path"]

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "key":
            return key
        if name.startswith("item."):  # the self-play round table: not a pool stage
            return m.group(0)
        if name.startswith("path."):
            return str(paths[name[5:]])
        node: Any = params
        for part in name.split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, text)


def _dvc_status(root: Path) -> dict[str, Any]:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout or "{}")


def test_adding_a_pool_model_runs_only_its_stages(tmp_path: Path) -> None:
    """One pool (scores.measured) feeds benchmark@ and generate@: adding a model leaves every
    other model's instances up to date; what reads all of them (scores, judge) re-runs."""
    import subprocess

    import yaml

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["scores"]["measured"] = {"a": "org/a", "b": {"model": "org/b", "modes": ["pool"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    files: set[str] = set()
    stages = {n: s for n, s in stages.items() if not n.startswith("sp_")}  # self-play: apart
    for spec in stages.values():
        keys = list(params["scores"]["measured"]) if "foreach" in spec else [""]
        body = spec.get("do", spec)
        for key in keys:
            for kind in ("deps", "outs", "metrics", "plots"):
                for item in body.get(kind, []):
                    path = _resolve(
                        next(iter(item)) if isinstance(item, dict) else item, key, params
                    )
                    files.add(path)
    for rel in sorted(files):
        p = tmp_path / rel
        if any(f.startswith(rel + "/") for f in files):  # a directory holding other paths
            p.mkdir(parents=True, exist_ok=True)
            (p / ".gitkeep").touch()
        elif not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
    commit = [sys.executable, "-m", "dvc", "commit", "-f", "-q", *stages]
    subprocess.run(commit, cwd=tmp_path, check=True)
    before = {k: v for k, v in _dvc_status(tmp_path).items() if not k.startswith("sp_")}
    assert before == {}, before
    params["scores"]["measured"]["c"] = {"model": "org/c", "modes": ["pool"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    after = {k: v for k, v in _dvc_status(tmp_path).items() if not k.startswith("sp_")}
    assert set(after) == {"benchmark@c", "generate@c", "scores", "judge"}, after
    # the new instances have never run; the readers of the whole pool see a changed param
    assert "scores.measured" in json.dumps(after["judge"])


def test_scores_follow_the_completions_mode(karma_cli: Any, tmp_path: Path) -> None:
    """dataset: the reported table (+ dataset-mode rows); pool: the pool's measured rows only."""
    measured = tmp_path / "measured"
    measured.mkdir()
    row = {"arc_easy": 0.5, "hellaswag": 0.4, "meta.protocol": "loglik"}
    (measured / "p1.json").write_text(json.dumps({"model": "p1", **row}))
    (measured / "p2.json").write_text(json.dumps({"model": "p2", **row, "arc_easy": 0.7}))
    pool = "scores.measured={p1: {model: x, modes: [pool]}, p2: {model: y, modes: [pool]}}"
    out = tmp_path / "scores.csv"
    args = ["scores", "--measured-dir", str(measured), "--out", str(out), "-S", pool]
    code, _, err = karma_cli(*args)
    assert code == 0, err
    dataset = pl.read_csv(out)
    assert dataset.height == 16 and "p1" not in dataset["model"].to_list()
    code, _, err = karma_cli(*args, "-S", "completions=pool")
    assert code == 0, err
    assert pl.read_csv(out)["model"].to_list() == ["p1", "p2"]
