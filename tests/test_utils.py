"""pi_peft.utils: atomic outputs, the positive-int check, the JSON writer."""


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from pi_peft.utils import atomic_output_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
