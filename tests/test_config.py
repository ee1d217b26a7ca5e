import pytest

from app.config import ConfigError, Settings


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert (settings.model, settings.device, settings.keepalive_seconds, settings.max_body_bytes,
            settings.normalize) == ("facebook/musicgen-small", "auto", 0.5, 16 * 1024 * 1024, "loudness")
    assert settings.mbd_source == "facebook/multiband-diffusion"


def test_environment_overrides_and_debug_mbd():
    settings = Settings.from_env({"MUSICGEN_MODEL": "debug", "MUSICGEN_KEEPALIVE_SECONDS": "1.5",
                                  "MUSICGEN_MBD_PRELOAD": "yes", "MUSICGEN_MAX_BODY_BYTES": "2048"})
    assert (settings.model, settings.keepalive_seconds, settings.mbd_preload, settings.max_body_bytes) == (
        "debug", 1.5, True, 2048)
    assert settings.mbd_source == "debug" and Settings(model="debug-stereo").mbd_source == "debug"


@pytest.mark.parametrize("name, value", [
    ("MUSICGEN_DEVICE", "tpu"), ("MUSICGEN_KEEPALIVE_SECONDS", "soon"), ("MUSICGEN_KEEPALIVE_SECONDS", "0"),
    ("MUSICGEN_NORMALIZE", "loud"), ("MUSICGEN_MBD_PRELOAD", "maybe"), ("MUSICGEN_MAX_BODY_BYTES", "10"),
    ("MUSICGEN_LOG_LEVEL", "chatty"),
])
def test_bad_values_fail_at_start_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})
