"""The integrators' API through gradio_client against the running app: named endpoints only, /ask and
/compare on a sample case and on an uploaded file, /export's files, readable errors, the README example."""
import re
import time

import nibabel as nib
import numpy as np
import pytest
from app_server import ROOT, start_app, stop_app
from conftest import SAMPLES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_log(tmp_path_factory):
    return tmp_path_factory.mktemp("applog") / "app.log"


@pytest.fixture(scope="module")
def api_url(tiny_model_dir, tmp_path_factory, app_log):
    tmp = tmp_path_factory.mktemp
    proc, url = start_app(tiny_model_dir, tmp("gradio_cache"), tmp("tmp"), app_log)
    yield url
    stop_app(proc, app_log)


@pytest.fixture(scope="module")
def client(api_url, tmp_path_factory):
    from gradio_client import Client

    return Client(api_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    """A crop of the chest sample as an uploaded NIfTI, with its label map cropped alike."""
    d = tmp_path_factory.mktemp("upload")
    ct = nib.load(str(SAMPLES / "chest_aorta_ct/ct.nii.gz"))
    lab = nib.load(str(SAMPLES / "chest_aorta_ct/labels.nii.gz"))
    crop = (slice(10, 110), slice(10, 110), slice(20, 140))
    nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj)[crop], ct.affine), str(d / "scan.nii.gz"))
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj)[crop].astype(np.int16), ct.affine),
             str(d / "labels.nii.gz"))
    return d


def test_the_api_page_lists_the_named_endpoints_only(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/ask", "/compare", "/export"}
    assert not info["unnamed_endpoints"]
    params = [p["parameter_name"] for p in info["named_endpoints"]["/ask"]["parameters"]]
    assert params == ["question", "scan", "sample", "budget", "label_map", "label_table", "prior", "series",
                      "prior_series"]


def test_ask_and_compare_on_a_sample_case(client):
    r = client.predict(question="Is there a cyst in the left kidney?", sample="abdomen_ct", budget="25%",
                       api_name="/ask")
    assert r["kept"] == 250 and r["total"] == 1000 and len(r["kept_token_indices"]) == 250
    assert r["budget"] == "25%" and 0 <= r["theta"] <= 1 and r["raw_text"] is not None
    assert r["asked_structures"] == ["kidney_left"] and "liver" in r["per_organ_retention"]
    assert r["readable"] is (r["answer"] is not None)
    assert r["checkpoint"]["name"] and r["scan"]["title"] == "Abdomen/pelvis CT (3 mm)"
    c = client.predict(question="Is the spleen enlarged?", sample="abdomen_ct", api_name="/compare")
    assert c["question"] == "Is the spleen enlarged?"          # was always "" (the session's last ask)
    assert [row["budget"] for row in c["rows"]] == ["Auto", "10%", "25%", "50%", "Full"]
    assert [row["kept"] for row in c["rows"]][1:] == [100, 250, 500, 1000]


def test_ask_and_compare_on_an_uploaded_file(client, upload):
    from gradio_client import handle_file

    scan = [handle_file(str(upload / "scan.nii.gz"))]
    r = client.predict(question="Is there an abnormality of the aorta?", scan=scan, budget="top_k:120",
                       label_map=handle_file(str(upload / "labels.nii.gz")), api_name="/ask")
    assert r["kept"] == 120 and r["scan"]["summary"].startswith("100×100×120")
    assert r["per_organ_retention"] and isinstance(r["warnings"], list)
    c = client.predict(question="Is there a nodule in the lung?", scan=scan, api_name="/compare")
    assert len(c["rows"]) == 5 and c["rows"][-1]["kept"] == 1000


def test_a_prior_study_of_several_series_is_asked_with_the_series_named(client, upload, tmp_path):
    """``prior_series`` picks the prior's series when its upload holds several; the answer names the series
    asked with and those found; a series the prior does not hold is refused in words."""
    import zipfile

    from gradio_client import handle_file
    from test_volume import _pacs_export

    study = _pacs_export(tmp_path)
    prior = tmp_path / "earlier_study.zip"
    with zipfile.ZipFile(prior, "w") as z:
        for f in sorted(study.iterdir()):
            z.write(f, f"study/{f.name}")
    ask = dict(question="Has the aortic lesion grown since the prior scan?",
               scan=[handle_file(str(upload / "scan.nii.gz"))], prior=handle_file(str(prior)),
               api_name="/ask")
    found = client.predict(**ask)["prior_scan"]["series_found"]   # the default series, and the others listed
    assert len(found) == 3 and "Br38f" in found[0]["label"]
    lung = next(x["series"] for x in found if "Lung 2.0 Bl57" in x["label"])
    r = client.predict(prior_series=lung, **ask)
    assert r["prior_scan"]["series"] == lung and r["prior_scan"]["series_found"] == found
    assert "kernel Bl57" in r["prior_scan"]["scan"] and "×17 voxels" in r["prior_scan"]["scan"]
    with pytest.raises(Exception, match=f"not in this upload.*Lung 2.0 Bl57.*{lung}"):
        client.predict(prior_series="1.2.3.4", **ask)
    with pytest.raises(Exception, match="no prior scan was given"):
        client.predict(prior_series=lung, **{**ask, "prior": None})


def test_export_returns_the_mask_on_the_scan_grid(client, upload):
    from gradio_client import handle_file

    files, r = client.predict(question="Is there an abnormality of the aorta?",
                              scan=[handle_file(str(upload / "scan.nii.gz"))], budget="auto",
                              api_name="/export")
    names = {p.rsplit("/", 1)[-1]: p for p in files}
    assert {"kept_blocks.nii.gz", "report.json"} <= set(names)
    mask = nib.load(names["kept_blocks.nii.gz"])
    assert mask.shape == (100, 100, 120)
    assert np.asarray(mask.dataobj).astype(bool).any() == (r["kept"] > 0)


def test_bad_requests_get_readable_errors(client, tmp_path):
    from gradio_client import handle_file

    with pytest.raises(Exception, match="at least") as e:
        client.predict(question="Is there a lesion?", sample="abdomen_ct", budget="0", api_name="/ask")
    with pytest.raises(Exception, match="sample id") as e:
        client.predict(question="Is there a lesion?", api_name="/ask")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(Exception, match="broken.nii.gz") as e:
        client.predict(question="Is there a lesion?", scan=[handle_file(str(bad))], api_name="/ask")
    assert "/tmp" not in str(e.value) and "gradio" not in str(e.value)


def test_refused_requests_leave_no_traceback_in_the_server_log(client, app_log):
    """A request refused for what it asks (a budget, a sample id, a question) is the client's error, said
    in one sentence; the server log held a 20-line traceback for each (gr.Error prints one by default)."""
    asks = [dict(sample="abdomen_ct", budget="top_k:abc"), dict(sample="nope"), dict(question=" "),
            dict(sample="abdomen_ct", question="x" * 2000)]
    for kw in asks:
        kw = {"question": "Is there a lesion?", **kw}
        with pytest.raises(Exception) as e:
            client.predict(**kw, api_name="/ask")
        assert "float" not in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(Exception, match="type a question"):
        client.predict(question="", sample="abdomen_ct", api_name="/compare")
    time.sleep(0.5)
    assert "Traceback" not in app_log.read_text()


def _raw(api_url: str, api_name: str, data, session: str) -> dict:
    """One event sent as a raw HTTP client sends it (any JSON, NaN included); its last message."""
    import json

    import httpx

    deps = httpx.get(api_url + "config", timeout=30).json()["dependencies"]
    fn = next(d["id"] for d in deps if d.get("api_name") == api_name)
    body = json.dumps({"data": data, "fn_index": fn, "session_hash": session, "event_data": None,
                       "trigger_id": None})
    httpx.post(api_url + "gradio_api/queue/join", content=body, timeout=30,
               headers={"content-type": "application/json"}).raise_for_status()
    with httpx.stream("GET", api_url + "gradio_api/queue/data", params={"session_hash": session},
                      timeout=120) as stream:
        for line in stream.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") == "process_completed":
                return msg
    raise AssertionError("no answer")


def test_inputs_of_the_wrong_kind_are_refused_in_a_sentence_without_a_traceback(api_url, app_log):
    """What a raw client can send and the page cannot: a text, a list, NaN or 1e308 for a slider, a mode no
    list offers, a scan that is a path string. Gradio refused these with its internals' words ("Could not
    preprocess input component at index 4 (a `slider` component)… TypeError", pydantic's "1 validation
    error for ListFiles"), NaN reached the handlers ("cannot convert float NaN to integer"), and each left
    a traceback in the log. Now: one sentence, nothing in the log but a line, and the session goes on."""
    q = "Is there a lesion in the liver?"
    ask = lambda mode, tokens, width=400: [None, None, q, mode, tokens, 25, 0.5, width, 40, 0.35]  # noqa: E731
    assert _raw(api_url, "ui_load_case", ["Abdomen/pelvis CT (3 mm)", None, None, ""], "s-1")["success"]
    before = len(app_log.read_text())
    bad = [("ui_ask", ask("Tokens", "abc")), ("ui_ask", ask("Tokens", [1])), ("ui_ask", ask("Tokens", None)),
           ("ui_ask", ask("Tokens", float("nan"))), ("ui_ask", ask("Auto", 300, float("inf"))),
           ("ui_ask", ask("Tokens", 1e308)), ("ui_ask", ask("bogus", 300)),
           ("ask", [q, "/etc/passwd", None, "auto", None, None, None, None]),
           ("ask", [q, [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}], None, "auto",
                    None, None, None, None])]
    for name, data in bad:
        msg = _raw(api_url, name, data, "s-1")
        error = msg["output"]["error"]
        assert not msg["success"] and error and "\n" not in error, (name, data, error)
        for word in ("Error:", "preprocess", "pydantic", "index 4", "float NaN", "<class"):
            assert word not in error, (name, data, error)
    assert _raw(api_url, "ui_ask", ask("Tokens", 300), "s-1")["success"]     # the session goes on
    time.sleep(0.5)
    assert "Traceback" not in app_log.read_text()[before:]


def test_an_upload_cut_off_halfway_leaves_no_traceback(api_url, app_log, client):
    """A tab closed while its upload was being sent: uvicorn logged 'Exception in ASGI application' and a
    60-line traceback (starlette's ClientDisconnect) for each; now one line, and the server goes on."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(api_url)
    before = len(app_log.read_text())
    part = (b'--B\r\nContent-Disposition: form-data; name="files"; filename="ct.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 200_000)
    head = (f"POST /gradio_api/upload HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: 5000000\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head + part)
        time.sleep(0.5)
    time.sleep(1)
    r = client.predict(question="Is the spleen enlarged?", sample="abdomen_ct", api_name="/ask")
    assert r["total"] == 1000
    log = app_log.read_text()[before:]
    assert "Traceback" not in log and "Exception in ASGI" not in log


def test_the_readme_example_runs(api_url, monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(# Photon CT API example.*?)```", text, re.S)
    assert block, "README has no API example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(ROOT)                          # the example uploads a bundled sample by its path
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    exec(compile(code.replace("http://127.0.0.1:7860/", api_url), "README", "exec"), {})
    assert printed


def test_a_sample_id_is_found_with_spaces_around_it_and_a_long_unknown_one_keeps_the_known_ids():
    """' abdomen_ct ' was 'Unknown sample case'; a 100,000-character id's refusal was cut before the list
    of the ids there are."""
    from photon_core.io import samples

    first = samples.cases()[0]
    assert samples.case(f"  {first['id']}\n") is first
    with pytest.raises(ValueError) as e:
        samples.case("x" * 100_000)
    assert len(str(e.value)) < 300 and all(c["id"] in str(e.value) for c in samples.cases())


def _wait_for(app_log, text: str, start: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = app_log.read_text()[start:]
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the server log:\n{app_log.read_text()[start:][-3000:]}")


def test_a_load_whose_client_left_stops_on_the_server(api_url, app_log, client, tmp_path):
    """Gradio cancels an event's task, not the thread running its function: an /ask on a large upload
    whose client cancelled it (job.cancel()) or whose connection closed went on reading, preparing and
    encoding the scan for nobody. Now the server stops the load at its next step and says so in a line;
    the next request is answered."""
    import json

    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    rng = np.random.default_rng(0)
    big = tmp_path / "big.nii"                  # ≈ 1 s to read, seconds to prepare on a 2-core machine
    nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, (512, 512, 160), dtype=np.int16),
                             np.diag([0.8, 0.8, 2.0, 1.0])), str(big))

    start = len(app_log.read_text())          # 1. the client cancels its job while the scan loads
    job = Client(api_url, verbose=False).submit(question="Is there a lesion in the liver?",
                                                scan=[handle_file(str(big))], api_name="/ask")
    deadline = time.monotonic() + 120
    while job.status().code not in (Status.PROCESSING, Status.PROGRESS):
        assert time.monotonic() < deadline and not job.done(), job.status()
        time.sleep(0.02)
    job.cancel()
    log = _wait_for(app_log, "api ask stopped: its client is gone", start)

    start = len(app_log.read_text())          # 2. the client's connection closes while the scan loads
    with open(big, "rb") as f:
        uploaded = httpx.post(api_url + "gradio_api/upload", files={"files": ("big.nii", f)},
                              timeout=120).json()[0]
    fn = next(d["id"] for d in httpx.get(api_url + "config", timeout=30).json()["dependencies"]
              if d.get("api_name") == "ask")
    scan = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}]
    body = {"data": ["Is there a lesion in the liver?", scan, None, None, None, None, None, None, None],
            "fn_index": fn, "session_hash": "gone-mid-load", "event_data": None, "trigger_id": None}
    httpx.post(api_url + "gradio_api/queue/join", json=body, timeout=30).raise_for_status()
    with httpx.stream("GET", api_url + "gradio_api/queue/data", params={"session_hash": "gone-mid-load"},
                      timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") in ("process_starts", "progress"):
                break                           # the connection closes here
    log += _wait_for(app_log, "api ask stopped: its client is gone", start)

    r = client.predict(question="Is the spleen enlarged?", sample="abdomen_ct", api_name="/ask")
    assert r["total"] == 1000 and "Traceback" not in log
