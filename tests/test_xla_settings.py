"""The XLA:CPU tuning applied on import: only for the jaxlib it was measured on, never over the user's choice."""

from delib_jax import _xla


def test_flag_added_for_jaxlib_0_10(monkeypatch):
    monkeypatch.setattr(_xla, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    _xla.tune_cpu()
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + _xla.YNN_FLAG


def test_user_choice_and_other_versions_left_alone(monkeypatch):
    import os

    monkeypatch.setattr(_xla, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    _xla.tune_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setattr(_xla, "_jaxlib_version", lambda: (0, 11))
    monkeypatch.delenv("XLA_FLAGS")
    _xla.tune_cpu()
    assert "XLA_FLAGS" not in os.environ
