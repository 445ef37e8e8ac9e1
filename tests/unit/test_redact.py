from proxy.errors import error_response
from proxy.redact import redact


def test_redact_masks_tokens_keys_and_signatures():
    text = (
        "Authorization: Bearer abc.def.ghi SharedKey acct:c2ln "
        "url?sv=1&sig=AbC%2B%3D&se=2 AccountKey=Zm9vYmFy; "
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sGnAtUrE api-key=12345"
    )
    out = redact(text)
    for secret in ("abc.def.ghi", "acct:c2ln", "AbC%2B%3D", "Zm9vYmFy", "sGnAtUrE", "12345"):
        assert secret not in out
    assert "sv=1" in out and "Bearer <redacted>" in out


def test_error_response_is_azure_style_json_without_secrets():
    headers, body = error_response("KeylessTokenUnavailable", "failed: Bearer eyJa.eyJb.c")
    assert headers["x-ms-error-code"] == "KeylessTokenUnavailable"
    assert body.startswith(b'{"error": {"code": "KeylessTokenUnavailable", "message": ')
    assert b"eyJa" not in body
