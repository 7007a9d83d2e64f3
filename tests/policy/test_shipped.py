from pathlib import Path

from apiproxy.policy import Policy, shipped


def test_checkout_policies_are_found_first():
    path = shipped.shipped_policy("istio-remote.yaml")
    assert path == Path(__file__).resolve().parents[2] / "policies" / "istio-remote.yaml"
    assert Policy.load(path).rules


def test_wheel_data_dir_is_used_without_a_checkout(tmp_path, monkeypatch):
    data = tmp_path / "share" / "apiproxy" / "policies"
    data.mkdir(parents=True)
    (data / "minimal.yaml").write_text(
        (shipped.shipped_policy_dirs()[0] / "minimal.yaml").read_text()
    )
    monkeypatch.setattr(shipped, "shipped_policy_dirs", lambda: [tmp_path / "no-checkout", data])
    assert shipped.shipped_policy("minimal.yaml") == data / "minimal.yaml"
    # Nothing anywhere: the first candidate is named, so the error points at a familiar path.
    assert shipped.shipped_policy("absent.yaml") == tmp_path / "no-checkout" / "absent.yaml"
