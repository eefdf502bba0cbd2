"""The Serve config file and `expertmesh serve --print-config` describe one application."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from expertmesh.gateway.app_config import AppConfig
from expertmesh.gateway.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "serve-config.yaml"


def test_example_config_is_a_valid_serve_config_of_our_app(qwen3_moe_path):
    config = yaml.safe_load(EXAMPLE.read_text())
    ServeDeploySchema.model_validate(config)  # the schema `serve deploy` checks
    (app,) = config["applications"]
    assert app["import_path"] == "expertmesh.gateway.serve_app:build_app"
    args = {**app["args"], "model": str(qwen3_moe_path)}
    cfg = AppConfig.model_validate(args)
    assert cfg.ep_size == 2 and cfg.grpc_port == 50051


def test_print_config_round_trips_through_app_config(qwen3_moe_path, capsys):
    assert main(["serve", str(qwen3_moe_path), "--ep-size", "2", "--port", "8123", "--grpc-port", "0",
                 "--api-key", "k1", "--max-model-len", "256", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"]["port"] == 8123
    cfg = AppConfig.model_validate(config["applications"][0]["args"])
    assert (cfg.model, cfg.ep_size, cfg.api_keys, cfg.max_model_len, cfg.grpc_port) == \
        (str(qwen3_moe_path), 2, ["k1"], 256, None)


def test_unknown_and_bad_args_are_refused_by_name(qwen3_moe_path):
    with pytest.raises(ValueError, match="ep_sise"):
        AppConfig.model_validate({"model": str(qwen3_moe_path), "ep_sise": 2})
    with pytest.raises(ValueError, match="does not exist"):
        AppConfig.model_validate({"model": "/no/such/model"})
    with pytest.raises(ValueError, match="ep_size"):
        AppConfig.model_validate({"model": str(qwen3_moe_path), "ep_size": 0})
    for bad in ("maybe", [True], {"on": 1}, 2):
        with pytest.raises(ValueError, match="async_scheduling"):
            AppConfig.model_validate({"model": str(qwen3_moe_path), "async_scheduling": bad})
    for bad in (0, -1, "many", [256], 2.5, None):  # a cap that is not a positive whole number
        with pytest.raises(ValueError, match="max_prompts"):
            AppConfig.model_validate({"model": str(qwen3_moe_path), "max_prompts": bad})


def test_unknown_arg_names_the_closest_field(qwen3_moe_path):
    with pytest.raises(ValueError, match="unknown key 'max_model_length' \\(did you mean 'max_model_len'\\?\\)"):
        AppConfig.model_validate({"model": str(qwen3_moe_path), "max_model_length": 64})


def test_print_config_writes_no_path_of_the_home_folder(qwen3_moe_path, tmp_path, monkeypatch, capsys):
    """A config file is for other machines: paths under $HOME are written `~/...` and read back."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    model = home / "models" / "tiny"
    model.symlink_to(qwen3_moe_path, target_is_directory=True)
    template = home / "t.jinja"
    template.write_text("{{ messages }}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("EXPERTMESH_CACHE", raising=False)

    assert main(["serve", str(model), "--chat-template", str(template), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert str(home) not in out
    args = yaml.safe_load(out)["applications"][0]["args"]
    assert (args["model"], args["chat_template"]) == ("~/models/tiny", "~/t.jinja")
    cfg = AppConfig.model_validate(args)
    assert (cfg.model, cfg.chat_template) == (str(model), str(template))

    assert main(["serve", "--print-config"]) == 0  # the embedded default model, made under $HOME
    out = capsys.readouterr().out
    assert str(home) not in out
    args = yaml.safe_load(out)["applications"][0]["args"]
    assert args["model"] == "~/.cache/expertmesh/models/demo-qwen3-moe-v3"
    assert AppConfig.model_validate(args).model_path() == home / ".cache/expertmesh/models/demo-qwen3-moe-v3"


@pytest.mark.parametrize(("flags", "grpc_host"), [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0"),
                                                  (["--grpc-host", "0.0.0.0"], "0.0.0.0"),
                                                  (["--host", "0.0.0.0", "--grpc-host", "10.0.0.5"], "10.0.0.5")])
def test_grpc_binds_the_http_host_unless_told_otherwise(qwen3_moe_path, capsys, flags, grpc_host):
    assert main(["serve", str(qwen3_moe_path), *flags, "--print-config"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert AppConfig.model_validate(args).grpc_host == grpc_host


def test_a_hugging_face_repo_id_is_a_model(capsys):
    cfg = AppConfig(model="Qwen/Qwen3-30B-A3B", revision="main")
    assert cfg.model_name() == "Qwen/Qwen3-30B-A3B"  # as vLLM names it
    assert cfg.engine_config().load.model == "Qwen/Qwen3-30B-A3B"  # each replica fetches it on its node
    assert main(["serve", "Qwen/Qwen3-30B-A3B", "--revision", "v1", "--print-config"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert (args["model"], args["revision"]) == ("Qwen/Qwen3-30B-A3B", "v1")
    with pytest.raises(ValueError, match="not a Hugging Face repo id"):
        AppConfig(model="no/such/dir")
