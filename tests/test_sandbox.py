"""The sandbox for generated code: passing and failing programs, time/memory limits, network and process guards."""

import pytest

from spectral_peft.evaluation.sandbox import namespace_available, run_python, run_with_tests


def test_passing_program_and_clean_environment():
    r = run_python("import os\nprint(6 * 7)\nprint(sorted(os.environ))")
    assert r.ok and r.returncode == 0
    assert r.stdout.splitlines() == ["42", "['HOME', 'LANG', 'PATH', 'TMPDIR']"]


def test_tests_pass_and_failing_assert():
    assert run_with_tests("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3"]).ok
    r = run_with_tests("def add(a, b):\n    return a - b", ["assert add(1, 2) == 3"])
    assert r.status == "error" and r.returncode == 1 and "AssertionError" in r.stderr


def test_early_exit_with_status_zero_is_not_a_pass():
    r = run_with_tests("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)", ["assert add(1, 2) == 3"])
    assert not r.ok


def test_infinite_loop_is_killed_by_the_wall_clock_limit():
    r = run_python("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout" and r.returncode is None and r.duration < 5


def test_cpu_limit():
    r = run_python("while True:\n    pass", timeout=10.0, cpu_seconds=1)
    assert r.status == "cpu" and r.duration < 5


def test_memory_hog_is_stopped():
    r = run_python("x = bytearray(4 * 1024 ** 3)", memory_mb=256)
    assert r.status == "memory" and not r.ok


def test_output_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", timeout=5.0, max_output_bytes=10_000)
    assert not r.ok and len(r.stdout) <= 10_000


@pytest.mark.parametrize("network", ["auto", "prelude"])
def test_network_attempts_are_refused(network):
    for code in ("import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)",
                 "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
                 "import urllib.request\nurllib.request.urlopen('http://192.0.2.1/', timeout=1)"):
        r = run_python(code, network=network)
        assert r.status == "error" and "disabled in the spectral-peft sandbox" in r.stderr


@pytest.mark.skipif(not namespace_available(), reason="no unprivileged network namespace here")
def test_network_namespace_blocks_even_a_prelude_bypass():
    code = ("import sys\nfor m in ('socket', '_socket'):\n    sys.modules.pop(m, None)\nimport _socket\n"
            "s = _socket.socket(2, 1)\ns.settimeout(1)\ns.connect(('192.0.2.1', 80))")
    r = run_python(code, network="namespace")
    assert r.status == "error" and r.network_isolation == "namespace" and "unreachable" in r.stderr


def test_process_creation_and_destructive_calls_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 f"import os\nos.remove({str(victim)!r})", "import shutil\nshutil.rmtree('/tmp/none')",
                 "import ctypes"):
        r = run_python(code)
        assert r.status == "error" and "disabled in the spectral-peft sandbox" in r.stderr, code
    assert victim.exists()


def test_bad_network_option():
    with pytest.raises(ValueError):
        run_python("pass", network="none")
