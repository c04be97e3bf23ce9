"""Reliability and security through the app's service layer and the server process."""
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from photon_core.io.volume import VolumeError
from photon_core.model.budget import Budget


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from app.service import Engine, Settings

    engine = Engine(Settings(model_dir=str(tiny_model_dir), device="cpu", max_new_tokens=4, cache_volumes=2))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def session(engine):
    return engine.load_case("abdomen_ct")


@pytest.mark.parametrize("question,msg", [("", "type a question"), ("   \n ", "type a question"),
                                          ("x" * 10_000, "limit is 1000"), (b"\xff\xfe bad \xff", None)])
def test_bad_questions_get_readable_errors_and_the_next_request_works(engine, session, question, msg):
    if msg is None:   # non-UTF-8 bytes are decoded with replacement and answered
        a = engine.ask(session, question, Budget("auto"))
        assert a.total == 1000
    else:
        with pytest.raises(ValueError, match=msg):
            engine.ask(session, question, Budget("auto"))
    assert engine.ask(session, "Is there a lesion in the liver?", Budget("top_k", 50)).kept == 50


def test_encoded_volume_cache_is_lru_bounded(engine):
    sessions = [engine.load_case(c) for c in ("abdomen_ct", "chest_aorta_ct", "dicom_ct")]
    assert len(engine._cache) == 2                    # cache_volumes=2
    a = engine.ask(sessions[0], "Is the spleen enlarged?", Budget("auto"))   # evicted one is re-encoded
    assert a.total == 1000 and len(engine._cache) == 2


def test_budget_change_does_not_re_encode(engine, session):
    p = engine.predictor
    before = p.encode_calls
    engine.ask(session, "Is there a lesion in the liver?", Budget("ratio", 0.1))
    engine.ask(session, "Is there a lesion in the liver?", Budget("ratio", 0.5))
    assert p.encode_calls == before


def test_max_new_tokens_is_bounded(engine, session):
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.ask(session, "Is there a lesion?", Budget("auto"), max_new_tokens=100_000)


def test_patient_identifiers_never_leak(engine, tmp_path, caplog):
    from test_volume import _dicom_series

    folder = _dicom_series(tmp_path / "Doe_Jane_series", n=20, name="Doe^Jane")
    with caplog.at_level("DEBUG"):
        s = engine.load_upload([str(p) for p in sorted(folder.iterdir())], None)
        a, _ = engine.answer(s, "Is there a lesion in the liver?", Budget("auto"))   # kept for the export
        files = engine.export(s, {"view3d": b"\x89PNG"}, tmp_path / "export")
    blob = caplog.text + a.text + json.dumps(a.to_dict()) + repr(s.volume.meta)
    for f in files:
        blob += f.name + (f.read_text() if f.suffix == ".json" else "")
        assert "Doe" not in f.name and "Jane" not in f.name
    import nibabel as nib

    hdr = nib.load(str([f for f in files if f.name.endswith(".nii.gz")][0])).header
    blob += "".join(hdr[k].tobytes().decode(errors="ignore") for k in ("descrip", "db_name"))
    for secret in ("Doe", "Jane", "ID-12345", "19700101", str(tmp_path)):
        assert secret not in blob


def test_bad_upload_through_the_service_keeps_working(engine, tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(VolumeError):
        engine.load_upload([str(bad)], None)
    with pytest.raises(VolumeError, match="one NIfTI"):
        engine.load_upload([str(bad), str(bad)], None)
    with pytest.raises(VolumeError, match="Choose a file"):
        engine.load_upload([], None)
    s = engine.load_case("chest_aorta_ct")
    assert engine.ask(s, "Is there an abnormality of the aorta?", Budget("auto")).total == 1000


AUDIT = r'''
import socket, sys
def hook(event, args):
    if event == "socket.connect":
        addr = args[1]
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            print("OUTBOUND", addr, flush=True)
            raise OSError("outbound network blocked by test")
    if event == "socket.getaddrinfo":
        host = args[0]
        if host not in (None, "localhost", "127.0.0.1", "::1") and not str(host).startswith("127."):
            print("DNS", host, flush=True)
            raise OSError("DNS blocked by test")
sys.addaudithook(hook)
sys.argv = ["app.py", "--model", sys.argv[1], "--device", "cpu", "--port", sys.argv[2]] + sys.argv[3:]
import runpy
runpy.run_path("app.py", run_name="__main__")
'''


def _start(tiny_model_dir, port, *extra):
    env = dict(os.environ)
    env.pop("GRADIO_ANALYTICS_ENABLED", None)   # the app must turn analytics off by itself
    return subprocess.Popen([sys.executable, "-c", AUDIT, str(tiny_model_dir), str(port), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_http(port, proc, auth=None, timeout=120):
    import urllib.request

    for _ in range(timeout * 2):
        if proc.poll() is not None:
            break
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("server did not start:\n" + proc.stdout.read())


def test_no_outbound_network_at_import_or_launch_and_loopback_bind(tiny_model_dir):
    from app_server import free_port as _free_port

    port = _free_port()
    proc = _start(tiny_model_dir, port)
    try:
        _wait_http(port, proc)
        time.sleep(3)   # give any background telemetry a chance to fire
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "OUTBOUND" not in out and "DNS" not in out, out
    assert f"127.0.0.1:{port}" in out
    assert "share=True" in out or "gradio.live" not in out


def test_auth_is_enforced(tiny_model_dir):
    import urllib.error
    import urllib.parse
    import urllib.request

    from app_server import free_port as _free_port

    port = _free_port()
    proc = _start(tiny_model_dir, port, "--auth", "clinician:s3cret")
    try:
        _wait_http(port, proc)
        data = urllib.parse.urlencode({"username": "clinician", "password": "wrong"}).encode()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=data, timeout=5)
        ok = urllib.parse.urlencode({"username": "clinician", "password": "s3cret"}).encode()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=ok, timeout=5).status == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_cli_rejects_malformed_auth(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "app.py", "--auth", "nopassword"], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0 and "USER:PASS" in r.stderr
    assert list(tmp_path.iterdir()) == []          # its Gradio cache folder went with it


def _app_script(monkeypatch):
    """app.py as a module (not run): its argument parsing and settings, without starting a server."""
    import importlib.util

    for var in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, os.environ.get(var, "1" if var != "GRADIO_ANALYTICS_ENABLED" else "False"))
    spec = importlib.util.spec_from_file_location("photon_ct_app_script", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args,says", [(["--max-new-tokens", "0"], "between 1 and 256"),
                                       (["--max-new-tokens", "300"], "between 1 and 256"),
                                       (["--cache-volumes", "0"], "--cache-volumes"),
                                       (["--max-upload-mb", "-5"], "--max-upload-mb"),
                                       (["--port", "70000"], "--port")])
def test_cli_refuses_settings_no_ask_could_run_with(monkeypatch, capsys, args, says):
    """A limit outside what the app can serve is refused at start (it used to start: every ask then failed
    on --max-new-tokens over 256, every load with a KeyError on --cache-volumes 0)."""
    app_script = _app_script(monkeypatch)
    with pytest.raises(SystemExit) as e:
        app_script.parse_args(args)
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert app_script.parse_args(["--max-new-tokens", "256", "--cache-volumes", "1"]).max_new_tokens == 256


def test_max_upload_mb_is_the_loaders_limit_too(monkeypatch, tmp_path):
    """--max-upload-mb raised Gradio's limit only: a 1.2 GB file was taken in, then refused by the loader's
    own 1 GB limit. Now one number bounds both."""
    app_script = _app_script(monkeypatch)
    settings = app_script.settings(app_script.parse_args(["--max-upload-mb", "2000"]))
    assert settings.limits.max_file_bytes == 2_000_000_000
    big = tmp_path / "scan.nii"
    with open(big, "wb") as f:                      # sparse: 1.2 GB of size, no disk
        f.truncate(1_200_000_000)
    from photon_core.io.volume import load_volume

    with pytest.raises(VolumeError) as e:
        load_volume(big, settings.limits)
    assert "upload limit" not in str(e.value)
    small = app_script.settings(app_script.parse_args(["--max-upload-mb", "500"]))
    with pytest.raises(VolumeError, match="upload limit is 0.5 GB"):
        load_volume(big, small.limits)


def test_a_gradio_temp_dir_not_made_yet_is_made(tmp_path):
    """GRADIO_TEMP_DIR naming a folder that does not exist yet (Gradio itself makes it) stopped app.py with
    a FileNotFoundError traceback before it read its arguments, even for --help."""
    missing = tmp_path / "not" / "yet"
    r = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, GRADIO_TEMP_DIR=str(missing)))
    assert r.returncode == 0 and "Traceback" not in r.stderr and "--port" in r.stdout, r.stderr[-2000:]
    assert missing.is_dir() and list(missing.iterdir()) == []       # its own folder inside went at exit


def test_served_files_go_at_exit_without_close(tiny_model_dir, tmp_path):
    code = ("from app.view import FileStore; s = FileStore.create(); f = s.session('x'); "
            "p = f.write('scene', '.glb', b'x'); print('made', p.exists())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TMPDIR=str(tmp_path), GRADIO_TEMP_DIR=str(tmp_path / "gradio")))
    assert r.returncode == 0 and "made True" in r.stdout, r.stderr[-2000:]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_cuda_oom_during_a_request_is_reported_and_the_server_goes_on(monkeypatch, engine, session, tmp_path):
    """A CUDA OOM inside a question: the card says so, memory is freed, the next question works."""
    import torch

    from app import handlers as h
    from app.view import FileStore, build_view

    store = FileStore(tmp_path / "served")
    view = build_view(session, store.session("x"))

    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    real = engine.batcher.ask

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.batcher, "ask", oom)
    out = h.ask(session, view, "Is there a lesion?", "Auto", 300, 25, 0.5, 400, 40, 0.35, engine=engine)
    assert "ran out of memory" in out["card"] and freed == [1]
    monkeypatch.setattr(engine.batcher, "ask", real)
    assert engine.ask(session, "Is there a lesion?", Budget("auto")).total == 1000
    store.close()


def test_unexpected_errors_are_readable_and_do_not_leak_internals(caplog):
    from app.handlers import message

    with caplog.at_level("ERROR"):
        text = message(KeyError("/secret/path/patient_Jane"), "test")
    assert "still running" in text and "secret" not in text and "KeyError" in caplog.text


def test_asked_organ_retention_and_its_warning(engine):
    """The retention of the organs a question names (the app's warning and case_answers.py read it):
    only the named organs the label map holds, and a warning for those kept below half."""
    import types

    import numpy as np

    from app.service import Session

    blocks = {n: np.zeros(1000, bool) for n in ("liver", "kidney_left", "kidney_right")}
    blocks["liver"][:10], blocks["kidney_left"][10:20], blocks["kidney_right"][20:30] = True, True, True
    keep = np.zeros(1000, bool)
    keep[:8], keep[10:12] = True, True                   # liver 0.8, left kidney 0.2, right kidney 0
    ans = types.SimpleNamespace(keep_grid=keep.reshape(10, 10, 10), text="yes", probability=0.9)
    s = Session(blocks=blocks)
    a = engine.audit(s, "Is there a cyst in the left kidney?", ans)
    assert a.asked_retention == {"kidney_left": 0.2} and a.retention["liver"] == 0.8
    assert a.warning == "only 2 of the 10 kidney left blocks were kept (20%)"
    assert engine.audit(s, "Is there a cyst in the right kidney?", ans).warning == \
        "none of the 10 kidney right blocks were kept"                  # not "only 0%"
    both = engine.audit(s, "Is there a lesion in the liver or the spleen?", ans)
    assert both.asked_retention == {"liver": 0.8}
    assert engine.audit(s, "Is there a lesion in the liver?", ans).warning == ""
    assert engine.audit(Session(), "Is there a lesion in the liver?", ans).asked == ()
