// Package auth issues and verifies the credentials of mini-program users:
// short-lived EdDSA access tokens that any node holding the deployment's
// public keys can verify offline, and long-lived opaque refresh tokens that
// rotate on every use and are stored only as hashes.
//
// Reuse: a rotated refresh token presented again revokes its session
// (a copy is in use), except a retry of the session's last rotation within
// a short grace while its successor is unused (a client that lost the
// answer): it gets the identical pair. Service decides it for its own
// sessions; for the cloud's, Issuer derives successor ids from the
// presented token so that the replicated state machine, which decides
// there, can have the same pair signed again (Reissue).
//
// A Keyring holds this process's Ed25519 signing keys (persisted on disk) and
// the public keys it trusts from elsewhere (the cloud's deployment keys,
// received through sync). A Service ties a Keyring to a refresh-token store
// in a bbolt database.
package auth
