"""cryopose.download against a local HTTP server that serves Zenodo-shaped records, with faults:
a connection cut mid-file, a server that ignores Range, a wrong checksum, a missing file, no
server at all."""

import hashlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cryopose import download
from cryopose.entry import Entry
from cryopose.errors import InputError
from cryopose.simulate import SimulationSpec, simulate_entry

CHUNK = 7000


class Server:
    """Records ``{id: {key: bytes}}`` served as ``/api/records/<id>`` and ``/records/<id>/files/<key>``."""

    def __init__(self, records: dict[int, dict[str, bytes]]):
        self.records = records
        self.cut_once: dict[str, int] = {}  # key → bytes sent before the connection is cut (once)
        self.stall_once: dict[str, int] = {}  # key → bytes sent before the server waits for `release`
        self.release = threading.Event()
        self.wrong_md5: set[str] = set()
        self.missing: set[str] = set()  # listed in the record, 404 on the server
        self.ignore_range = False
        self.served: dict[str, int] = {}  # key → body bytes sent
        self.ranges: list[tuple[str, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["api", "records"]:
                    files = server.records.get(int(parts[2]))
                    if files is None:
                        return self.send_error(404)
                    listing = [
                        {
                            "key": k,
                            "size": len(v),
                            "checksum": "md5:" + ("0" * 32 if k in server.wrong_md5 else hashlib.md5(v).hexdigest()),
                        }
                        for k, v in files.items()
                    ]
                    body = json.dumps({"id": int(parts[2]), "files": listing}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                record, key = int(parts[1]), parts[3]
                data = server.records.get(record, {}).get(key)
                if data is None or key in server.missing:
                    return self.send_error(404)
                start = 0
                if "Range" in self.headers and not server.ignore_range:
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    server.ranges.append((key, start))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if key in server.stall_once:
                    n = server.stall_once.pop(key)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    server.served[key] = server.served.get(key, 0) + n
                    server.release.wait(60)
                    self.close_connection = True
                    return
                if key in server.cut_once:
                    body = body[: server.cut_once.pop(key)]
                    self.wfile.write(body)
                    server.served[key] = server.served.get(key, 0) + len(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)
                server.served[key] = server.served.get(key, 0) + len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    spec = SimulationSpec(name="TEST", symmetry="C2", box_size=32, pixel_size=4.1, n_particles=40, snr=1.0, seed=3)
    return simulate_entry(spec, tmp_path_factory.mktemp("src"), progress=False)


def _records(source: Path) -> dict[int, dict[str, bytes]]:
    records = {}
    for half, record in enumerate(download.CESPED_RECORDS["TEST"]):
        files = {
            f"particles_{half}.star": (source / f"particles_{half}.star").read_bytes(),
            f"info_{half}.json": (source / f"info_{half}.json").read_bytes(),
        }
        stack = (source / f"particles_{half}.mrcs").read_bytes()
        for i in range(0, len(stack), CHUNK):
            files[f"particles_{half}.mrcs.chunk_{i // CHUNK}"] = stack[i : i + CHUNK]
        records[record] = files
    # TEST's mask is 11120's in the mask record; other entries' masks sit beside it.
    records[download.MASK_RECORD] = {"11120_mask.mrc": (source / "TEST_mask.mrc").read_bytes(), "10166_mask.mrc": b"x"}
    return records


@pytest.fixture
def server(source):
    s = Server(_records(source))
    yield s
    s.close()


def _same_entry(a: Path, b: Path):
    for name in (
        "particles_0.star",
        "particles_1.star",
        "info_0.json",
        "info_1.json",
        "particles_0.mrcs",
        "particles_1.mrcs",
        "TEST_mask.mrc",
    ):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_download_reassembles_the_entry_through_a_cut_connection(source, server, tmp_path):
    server.cut_once["particles_0.mrcs.chunk_1"] = 3000  # mid-chunk
    out = download.download_entry("TEST", tmp_path, server.url, retries=3, backoff=0, progress=False)
    assert out == tmp_path / "TEST"
    _same_entry(source, out)
    Entry(out).validate()
    # The cut chunk was resumed with a Range request at its 3,000th byte: no byte fetched twice.
    assert ("particles_0.mrcs.chunk_1", 3000) in server.ranges
    assert server.served["particles_0.mrcs.chunk_1"] == CHUNK
    assert not (tmp_path / ".download").exists() and not list(out.glob("*.chunk_*")) and not list(out.glob("*.part"))
    # A second call finds the entry and fetches nothing.
    before = dict(server.served)
    download.download_entry("TEST", tmp_path, server.url, progress=False)
    assert server.served == before


def test_interrupted_download_resumes_to_the_same_bytes(source, server, tmp_path):
    """A run that gives up mid-file (as a killed one would) leaves a .part; the next run resumes it."""
    server.cut_once["particles_1.mrcs.chunk_0"] = 5000
    with pytest.raises(InputError, match="gave up after 0 retries.*resume from 5000 bytes"):
        download.download_entry("TEST", tmp_path, server.url, retries=0, progress=False)
    part = tmp_path / ".download" / "TEST" / "particles_1.mrcs.chunk_0.part"
    assert part.stat().st_size == 5000 and not (tmp_path / "TEST").exists()
    out = download.download_entry("TEST", tmp_path, server.url, retries=0, progress=False)
    _same_entry(source, out)
    assert server.served["particles_1.mrcs.chunk_0"] == CHUNK  # 5,000 + the remaining 2,000


def test_a_killed_download_resumes_to_the_same_bytes(source, server, tmp_path):
    """SIGKILL of `cryopose download` while a file is arriving: what was received stays in the
    .part, nothing is published, and the next run fetches only the rest."""
    key = "particles_0.mrcs.chunk_2"
    server.stall_once[key] = 4000
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cryopose",
            "download",
            "TEST",
            "--out",
            str(tmp_path),
            "--base-url",
            server.url,
            "--retries",
            "0",
            "--quiet",
        ]
    )
    part = tmp_path / ".download" / "TEST" / f"{key}.part"
    deadline = time.monotonic() + 120
    try:
        while not (part.exists() and part.stat().st_size == 4000):
            assert proc.poll() is None, f"the download ended ({proc.returncode}) before it was killed"
            assert time.monotonic() < deadline, "the download never reached the stalled file"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        server.release.set()
    assert proc.returncode == -9
    assert part.stat().st_size == 4000 and not (tmp_path / "TEST").exists()
    out = download.download_entry("TEST", tmp_path, server.url, retries=0, progress=False)
    _same_entry(source, out)
    assert (key, 4000) in server.ranges and server.served[key] == CHUNK


def test_a_server_that_ignores_range_restarts_the_file(source, server, tmp_path):
    server.cut_once["particles_0.mrcs.chunk_0"] = 4000
    server.ignore_range = True
    out = download.download_entry("TEST", tmp_path, server.url, retries=2, backoff=0, progress=False)
    _same_entry(source, out)
    assert server.served["particles_0.mrcs.chunk_0"] == 4000 + CHUNK  # the whole file again, not appended


def test_wrong_checksum_is_an_error_and_nothing_is_published(server, tmp_path):
    server.wrong_md5.add("info_0.json")
    with pytest.raises(InputError, match=r"info_0.json.*md5 .* does not match the record's 0{32}"):
        download.download_entry("TEST", tmp_path, server.url, retries=0, progress=False)
    assert not (tmp_path / "TEST").exists()
    assert not (tmp_path / ".download" / "TEST" / "info_0.json.part").exists()
    assert not (tmp_path / ".download" / "TEST" / "info_0.json").exists()


def test_missing_files_are_named(server, tmp_path):
    server.missing.add("particles_0.mrcs.chunk_2")
    with pytest.raises(InputError, match="not found on the server.*particles_0.mrcs.chunk_2"):
        download.download_entry("TEST", tmp_path, server.url, retries=0, progress=False)
    del server.records[download.CESPED_RECORDS["TEST"][1]]["particles_1.star"]
    server.missing.clear()
    with pytest.raises(InputError, match="record 10998591 has no particles_1.star"):
        download.download_entry("TEST", tmp_path, server.url, retries=0, progress=False)
    with pytest.raises(InputError, match="unknown CESPED entry 'EMPIAR-1'"):
        download.download_entry("EMPIAR-1", tmp_path, server.url)


def test_offline_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="cannot reach http://127.0.0.1:9/api/records/10998049.*offline"):
        download.download_entry("TEST", tmp_path, "http://127.0.0.1:9", retries=1, backoff=0, timeout=2, progress=False)


def test_the_workflow_downloads_a_real_entry(source, server, tmp_path):
    """The download_entry rule, pointed at the local server by the config's download.base_url."""
    from snakemake_runs import _workdir, snakemake

    work = _workdir(tmp_path / "w")
    server.cut_once["particles_1.mrcs.chunk_3"] = 1000
    (work / "config" / "local.yaml").write_text(f"download:\n  base_url: {server.url}\n  retries: 2\n")
    snakemake(work, "-c1", "resources/benchmark/TEST", "--configfile", "config/cesped.yaml", "config/local.yaml")
    _same_entry(source, work / "resources" / "benchmark" / "TEST")
    assert (work / "logs" / "download" / "TEST.log").is_file()
