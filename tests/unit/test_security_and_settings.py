import time

from flywheel.settings import ApiKey, Settings, hash_api_key
from serving.security import KeyRing, RateLimiter


def test_keyring_matches_hashed_keys_only():
    ring = KeyRing([ApiKey(name="svc", sha256=hash_api_key("s3cret"))])
    assert ring.authenticate("s3cret").name == "svc"
    assert ring.authenticate("s3cret ") is None and ring.authenticate("") is None


def test_token_bucket_allows_a_burst_then_asks_to_wait():
    limiter = RateLimiter(rate=10, burst=3)
    assert [limiter.acquire("k") for _ in range(3)] == [0, 0, 0]
    wait = limiter.acquire("k")
    assert 0 < wait <= 0.1 + 1e-6
    assert limiter.acquire("other") == 0  # buckets are per key


def test_wait_s_takes_nothing_and_refilled_buckets_are_forgotten():
    limiter = RateLimiter(rate=1000, burst=1, max_keys=4)
    assert limiter.wait_s("k") == 0 and limiter.wait_s("k") == 0
    limiter.acquire("k")
    assert 0 < limiter.wait_s("k") <= 0.001 + 1e-6
    for i in range(50):  # one address after another, each bucket full again 1 ms later
        limiter.acquire(f"addr-{i}")
        time.sleep(0.002)
    assert len(limiter._buckets) <= 5  # memory stays bounded by the keys active at once, not all ever seen


def test_environment_overrides_nested_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS", "k1:9093,k2:9093")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_USERNAME", "flywheel")
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_PASSWORD", "pw")
    monkeypatch.setenv("FLYWHEEL_LAKE__URI", "s3://bucket/lake")
    s = Settings()
    cfg = s.kafka.client_config()
    assert cfg["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert cfg["security_protocol"] == "SASL_SSL" and cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_password"] == "pw" and "pw" not in repr(s)
    assert s.lake.uri == "s3://bucket/lake"
    assert s.mlflow.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_embedded_defaults_follow_home(tmp_path):
    s = Settings(home=tmp_path, embedded={"broker_port": 12345})
    assert s.kafka.bootstrap_servers == "127.0.0.1:12345"
    assert s.lake.uri == tmp_path.resolve().joinpath("lake").as_uri()
