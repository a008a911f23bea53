"""Key custody: the root keyring (key files or an HSM key through PKCS#11), the server's own
audit and state keys wrapped under it, version material and data-key wrapping, and unwrapped
material held in memory only as long as allowed."""
