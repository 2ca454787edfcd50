// Package auth issues and verifies the credentials of mini-program users:
// short-lived EdDSA access tokens that any node holding the deployment's
// public keys can verify offline, and long-lived opaque refresh tokens that
// rotate on every use and are stored only as hashes.
//
// A Keyring holds this process's Ed25519 signing keys (persisted on disk) and
// the public keys it trusts from elsewhere (the cloud's deployment keys,
// received through sync). A Service ties a Keyring to a refresh-token store
// in a bbolt database.
package auth
