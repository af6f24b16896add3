import logging

import numpy as np

from skpatchcore import PatchCoreDetector
from skpatchcore.progress import log


def test_quiet_by_default(tiny_params, textures, capsys, caplog):
    caplog.set_level(logging.INFO, logger="skpatchcore")
    PatchCoreDetector(**tiny_params).fit(textures[0])
    assert caplog.records == []
    assert capsys.readouterr() == ("", "")


def test_verbose_logs_stages_and_shows_a_bar_on_stderr_only(tiny_params, textures, capsys, caplog):
    caplog.set_level(logging.INFO, logger="skpatchcore")
    det = PatchCoreDetector(**tiny_params, verbose=1).fit(textures[0])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("PatchCoreDetector: coreset of") for m in messages)
    out, err = capsys.readouterr()
    assert out == ""
    assert "patch features" in err  # the tqdm bar
    assert np.isfinite(det.offset_)


def test_verbose_cache_hit_is_logged(tiny_params, textures, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="skpatchcore")
    for _ in range(2):
        PatchCoreDetector(**tiny_params, memory=str(tmp_path), verbose=1).fit(textures[0])
    hits = [r for r in caplog.records if "read from" in r.getMessage()]
    assert len(hits) == 1


def test_log_is_silent_without_verbose(caplog):
    caplog.set_level(logging.INFO, logger="skpatchcore")
    log("hidden", 0)
    log("shown", 1)
    assert [r.getMessage() for r in caplog.records] == ["shown"]
