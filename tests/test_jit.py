"""The guard of numba's cache (wse_sim.jit): what one process caches, the next one keeps."""

import numba

from wse_sim import jit


def test_the_cache_folder_numba_will_use_gets_the_stamp(tmp_path, monkeypatch):
    # NUMBA_CACHE_DIR: numba makes its folder there only when it first saves code, after
    # the guard has run; the guard must stamp it all the same.
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    folder = jit._cache_dir()
    assert folder.parent == tmp_path
    jit.drop_stale_cache()
    stamp = (folder / jit.STAMP).read_text()
    (folder / "engine.run_worker-1.py311.nbi").write_text("cached")
    jit.drop_stale_cache()  # the next process: same sources, the cache stays
    assert (folder / "engine.run_worker-1.py311.nbi").exists()
    assert (folder / jit.STAMP).read_text() == stamp


def test_a_changed_stamp_drops_the_engine_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    folder = jit._cache_dir()
    jit.drop_stale_cache()
    (folder / jit.STAMP).write_text("sources of another version")
    (folder / "engine.run_worker-1.py311.nbi").write_text("stale")
    (folder / "other.f-1.py311.nbi").write_text("not the engine's")
    jit.drop_stale_cache()
    assert not (folder / "engine.run_worker-1.py311.nbi").exists()
    assert (folder / "other.f-1.py311.nbi").exists()
