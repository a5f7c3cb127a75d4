"""The guard of numba's cache (wse_sim.jit): what one process caches, the next one keeps."""

from wse_sim import jit


def test_a_missing_cache_folder_gets_the_stamp(tmp_path, monkeypatch):
    # Without bytecode (PYTHONDONTWRITEBYTECODE) the package's __pycache__ does not exist
    # yet when the guard runs; numba makes it afterwards.
    folder = tmp_path / "__pycache__"
    monkeypatch.setattr(jit, "_cache_dirs", lambda: [folder])
    jit.drop_stale_cache()
    stamp = (folder / jit.STAMP).read_text()
    (folder / "engine.run_worker-1.py311.nbi").write_text("cached")
    jit.drop_stale_cache()  # the next process: same sources, the cache stays
    assert (folder / "engine.run_worker-1.py311.nbi").exists()
    assert (folder / jit.STAMP).read_text() == stamp
