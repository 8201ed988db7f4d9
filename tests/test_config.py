import pytest

from sollol.config import ConfigError, NodeKind, load_settings, parse_node_spec

CONFIG = """
[server]
port = 9000
max_body_bytes = 1024

[[nodes]]
name = "gpu"
kind = "ollama"
url = "http://127.0.0.1:11434/"
models = ["llama3.2:latest"]

[[nodes]]
url = "http://127.0.0.1:8080"
"""


def write(tmp_path, text):
    path = tmp_path / "sollol.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file():
    settings = load_settings(environ={})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.database_url.startswith("sqlite:///")
    assert settings.nodes == ()


def test_file_values_and_nodes(tmp_path):
    settings = load_settings(write(tmp_path, CONFIG), environ={})
    assert settings.port == 9000
    assert settings.max_body_bytes == 1024
    first, second = settings.nodes
    assert (first.name, first.kind, first.url, first.models) == (
        "gpu",
        NodeKind.OLLAMA,
        "http://127.0.0.1:11434",
        ("llama3.2:latest",),
    )
    assert (second.name, second.kind, second.models) == ("127.0.0.1:8080", NodeKind.OPENAI, ())


def test_environment_overrides_file(tmp_path):
    settings = load_settings(
        write(tmp_path, CONFIG),
        environ={"SOLLOL_PORT": "9100", "SOLLOL_NODES": "llamacpp=http://127.0.0.1:8081"},
    )
    assert settings.port == 9100
    assert settings.nodes[-1].kind is NodeKind.LLAMACPP


def test_command_line_overrides_environment():
    settings = load_settings(
        environ={"SOLLOL_PORT": "9100"},
        overrides={"port": 9200, "host": None},
        extra_nodes=["http://127.0.0.1:8082"],
    )
    assert settings.port == 9200
    assert settings.host == "127.0.0.1"
    assert settings.nodes[0].url == "http://127.0.0.1:8082"


@pytest.mark.parametrize(
    ("spec", "kind", "url"),
    [
        ("http://127.0.0.1:8080", NodeKind.OPENAI, "http://127.0.0.1:8080"),
        ("ollama=http://127.0.0.1:11434", NodeKind.OLLAMA, "http://127.0.0.1:11434"),
        ("LlamaCpp=http://127.0.0.1:8080/", NodeKind.LLAMACPP, "http://127.0.0.1:8080"),
    ],
)
def test_node_spec(spec, kind, url):
    node = parse_node_spec(spec)
    assert (node.kind, node.url) == (kind, url)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 'x'\n", "not a valid port"),
        ("[server]\nport = -1\n", "must not be negative"),
        ("[server]\nport = 70000\n", "port must be from 0 to 65535"),
        ("[server]\nbogus = 1\n", "unknown [server] keys: bogus"),
        ("[[nodes]]\nkind = 'ollama'\n", "missing url"),
        ("[[nodes]]\nurl = 'ftp://x'\n", "is invalid"),
        ("[[nodes]]\nurl = 'http://127.0.0.1:1/v1'\n", "must not carry a path"),
        ("[[nodes]]\nurl = 'http://127.0.0.1:1'\nkind = 'vllm'\n", "unknown node kind"),
        ("[[nodes]]\nurl = 'http://127.0.0.1:1'\nmodels = 'tiny'\n", "models must be a list"),
        (
            "[[nodes]]\nurl = 'http://127.0.0.1:1'\n[[nodes]]\nurl = 'http://127.0.0.1:1'\n",
            "node names must be unique",
        ),
        ("[server\n", "not valid TOML"),
        ("[sever]\nport = 0\n", "unknown tables or keys: sever"),
        ("[[node]]\nurl = 'http://127.0.0.1:1'\n", "unknown tables or keys: node"),
    ],
)
def test_invalid_config_is_rejected(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(write(tmp_path, text), environ={})


def test_unknown_kind_names_its_table_once(tmp_path):
    text = "[[nodes]]\nurl = 'http://127.0.0.1:1'\nkind = 'vllm'\n"
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text), environ={})
    assert str(raised.value).count("[[nodes]] #1") == 1


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_invalid_environment_value_names_variable():
    with pytest.raises(ConfigError, match="SOLLOL_HEALTH_INTERVAL_S"):
        load_settings(environ={"SOLLOL_HEALTH_INTERVAL_S": "soon"})
