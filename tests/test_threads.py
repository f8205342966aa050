import os

from dndtrain import threads


def test_quiet_machine_spins_briefly_busy_machine_sleeps():
    assert threads.choose_openmp_waiting(0.1) == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    assert threads.choose_openmp_waiting(1.0) == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_unknown_load_takes_the_safe_choice(monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.2: None)
    assert threads.choose_openmp_waiting() == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_busy_cores_reads_proc_stat():
    busy = threads.busy_cores(0.05)
    if os.path.exists("/proc/stat"):
        assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6
    else:
        assert busy is None


def test_user_settings_win(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.set_openmp_waiting(0.0) == {}
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert threads.set_openmp_waiting(2.0) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
