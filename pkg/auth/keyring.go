package auth

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// KeyFileName is the keyring's file inside its directory.
const KeyFileName = "keys.json"

const keyFileVersion = 1

// storedKey is one key as persisted. Seed is present only for this
// process's own keys; trusted keys are public only.
type storedKey struct {
	KID     string    `json:"kid"`
	Public  []byte    `json:"public"`
	Seed    []byte    `json:"seed,omitempty"`
	Created time.Time `json:"created"`
	// Retired is when a local key stopped signing. It stays a verification
	// key until every token it signed has expired.
	Retired time.Time `json:"retired,omitzero"`
	Trusted bool      `json:"trusted,omitempty"`
}

type keyFile struct {
	Version    int         `json:"version"`
	SigningKID string      `json:"signing_kid"`
	Keys       []storedKey `json:"keys"`
}

// keySet is an immutable snapshot; verification reads it without locking.
type keySet struct {
	signingKID string
	signing    ed25519.PrivateKey
	verify     map[string]ed25519.PublicKey
	file       keyFile
}

// Keyring holds signing and verification keys. Reads (Verify, Sign) are
// lock-free; changes are serialised and persisted before they take effect.
type Keyring struct {
	dir string
	now func() time.Time

	mu  sync.Mutex // serialises changes and file writes
	cur atomic.Pointer[keySet]
}

// OpenKeyring loads the keyring in dir, creating the directory and a first
// signing key if there is none. now may be nil (time.Now).
func OpenKeyring(dir string, now func() time.Time) (*Keyring, error) {
	if now == nil {
		now = time.Now
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("keyring: create dir: %w", err)
	}
	k := &Keyring{dir: dir, now: now}
	b, err := os.ReadFile(filepath.Join(dir, KeyFileName))
	switch {
	case errors.Is(err, os.ErrNotExist):
		f := keyFile{Version: keyFileVersion}
		sk, err := newLocalKey(now())
		if err != nil {
			return nil, err
		}
		f.Keys = append(f.Keys, sk)
		f.SigningKID = sk.KID
		if err := k.commit(f); err != nil {
			return nil, err
		}
		return k, nil
	case err != nil:
		return nil, fmt.Errorf("keyring: read: %w", err)
	}
	var f keyFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("keyring: parse %s: %w", filepath.Join(dir, KeyFileName), err)
	}
	if f.Version != keyFileVersion {
		return nil, fmt.Errorf("keyring: unsupported key file version %d", f.Version)
	}
	ks, err := buildKeySet(f)
	if err != nil {
		return nil, fmt.Errorf("keyring: %s: %w", filepath.Join(dir, KeyFileName), err)
	}
	k.cur.Store(ks)
	return k, nil
}

func newLocalKey(now time.Time) (storedKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return storedKey{}, fmt.Errorf("keyring: generate key: %w", err)
	}
	return storedKey{KID: Thumbprint(pub), Public: pub, Seed: priv.Seed(), Created: now.UTC()}, nil
}

// Thumbprint is the RFC 7638 JWK thumbprint of an Ed25519 public key. Using
// it as the kid makes kids collision-free across every node of a deployment.
func Thumbprint(pub ed25519.PublicKey) string {
	// Members in lexicographic order, no whitespace, as RFC 7638 requires.
	canon := `{"crv":"Ed25519","kty":"OKP","x":"` + base64.RawURLEncoding.EncodeToString(pub) + `"}`
	sum := sha256.Sum256([]byte(canon))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func buildKeySet(f keyFile) (*keySet, error) {
	ks := &keySet{verify: make(map[string]ed25519.PublicKey, len(f.Keys)), file: f}
	for _, sk := range f.Keys {
		if sk.KID == "" || len(sk.Public) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("key %q: malformed public key", sk.KID)
		}
		if _, dup := ks.verify[sk.KID]; dup {
			return nil, fmt.Errorf("duplicate kid %q", sk.KID)
		}
		ks.verify[sk.KID] = ed25519.PublicKey(sk.Public)
		if sk.KID == f.SigningKID {
			if sk.Trusted || len(sk.Seed) != ed25519.SeedSize {
				return nil, fmt.Errorf("signing key %q has no private part", sk.KID)
			}
			priv := ed25519.NewKeyFromSeed(sk.Seed)
			if !slices.Equal([]byte(priv.Public().(ed25519.PublicKey)), sk.Public) {
				return nil, fmt.Errorf("signing key %q: seed does not match public key", sk.KID)
			}
			ks.signing, ks.signingKID = priv, sk.KID
		}
	}
	if ks.signing == nil {
		return nil, fmt.Errorf("signing key %q not found", f.SigningKID)
	}
	return ks, nil
}

// commit persists f and then publishes it; a failed write changes nothing.
// Callers hold k.mu (or are the constructor).
func (k *Keyring) commit(f keyFile) error {
	ks, err := buildKeySet(f)
	if err != nil {
		return fmt.Errorf("keyring: %w", err)
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return fmt.Errorf("keyring: encode: %w", err)
	}
	if k.dir != "" { // "" is an in-memory keyring (NewMemoryKeyring)
		if err := writeFileAtomic(filepath.Join(k.dir, KeyFileName), b, 0o600); err != nil {
			return fmt.Errorf("keyring: persist: %w", err)
		}
	}
	k.cur.Store(ks)
	return nil
}

// writeFileAtomic replaces path so that a crash leaves either the old or the
// new content, never a torn file: temp file, fsync, rename, fsync dir.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// SigningKID is the kid new tokens are signed with.
func (k *Keyring) SigningKID() string { return k.cur.Load().signingKID }

// signer returns the current signing key and its kid.
func (k *Keyring) signer() (string, ed25519.PrivateKey) {
	ks := k.cur.Load()
	return ks.signingKID, ks.signing
}

// publicKey returns the verification key for kid, local or trusted.
func (k *Keyring) publicKey(kid string) (ed25519.PublicKey, bool) {
	pk, ok := k.cur.Load().verify[kid]
	return pk, ok
}

// Rotate makes a new key the signing key. The previous one stays a
// verification key, so tokens it signed remain valid until they expire;
// RetireKeys removes it later.
func (k *Keyring) Rotate() (kid string, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.rotateLocked()
}

func (k *Keyring) rotateLocked() (string, error) {
	now := k.now().UTC()
	f := cloneFile(k.cur.Load().file)
	for i := range f.Keys {
		if f.Keys[i].KID == f.SigningKID {
			f.Keys[i].Retired = now
		}
	}
	sk, err := newLocalKey(now)
	if err != nil {
		return "", err
	}
	f.Keys = append(f.Keys, sk)
	f.SigningKID = sk.KID
	if err := k.commit(f); err != nil {
		return "", err
	}
	return sk.KID, nil
}

// RotateOlderThan rotates the signing key if it was created more than
// maxAge ago, returning the new key's kid, or "" when no rotation was due.
func (k *Keyring) RotateOlderThan(maxAge time.Duration) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cur := k.cur.Load().file
	for _, sk := range cur.Keys {
		if sk.KID == cur.SigningKID && k.now().Sub(sk.Created) < maxAge {
			return "", nil
		}
	}
	return k.rotateLocked()
}

// RetireKeys deletes local keys that stopped signing more than maxTokenAge
// ago: no unexpired token can carry their signature any more. maxTokenAge
// should be the access-token lifetime plus the verification leeway.
func (k *Keyring) RetireKeys(maxTokenAge time.Duration) (removed []string, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	cutoff := k.now().Add(-maxTokenAge)
	f := cloneFile(k.cur.Load().file)
	f.Keys = slices.DeleteFunc(f.Keys, func(sk storedKey) bool {
		drop := !sk.Trusted && !sk.Retired.IsZero() && sk.Retired.Before(cutoff) && sk.KID != f.SigningKID
		if drop {
			removed = append(removed, sk.KID)
		}
		return drop
	})
	if len(removed) == 0 {
		return nil, nil
	}
	if err := k.commit(f); err != nil {
		return nil, err
	}
	return removed, nil
}

// SetTrusted replaces the set of trusted public keys — keys this process
// verifies but does not sign with, such as the cloud's deployment keys — with
// set. It is meant to be called with the full current set each time sync
// delivers one; keys absent from set stop verifying. Local keys in set (an
// echo of this node's own keys) are ignored.
func (k *Keyring) SetTrusted(set JWKS) error {
	keys := make([]storedKey, 0, len(set.Keys))
	for i, j := range set.Keys {
		pub, err := j.publicKey()
		if err != nil {
			return fmt.Errorf("keyring: trusted key %d (%q): %w", i, j.Kid, err)
		}
		keys = append(keys, storedKey{KID: j.Kid, Public: pub, Trusted: true})
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	now := k.now().UTC()
	old := k.cur.Load().file
	local := make(map[string][]byte)
	created := make(map[string]time.Time)
	f := keyFile{Version: keyFileVersion, SigningKID: old.SigningKID}
	for _, sk := range old.Keys {
		if !sk.Trusted {
			local[sk.KID] = sk.Public
			f.Keys = append(f.Keys, sk)
		} else {
			created[sk.KID] = sk.Created
		}
	}
	seen := make(map[string]bool)
	for _, sk := range keys {
		if pub, ok := local[sk.KID]; ok {
			if !slices.Equal(pub, sk.Public) {
				return fmt.Errorf("keyring: trusted key %q collides with a local key", sk.KID)
			}
			continue
		}
		if seen[sk.KID] {
			return fmt.Errorf("keyring: duplicate trusted kid %q", sk.KID)
		}
		seen[sk.KID] = true
		sk.Created = now
		if c, ok := created[sk.KID]; ok {
			sk.Created = c
		}
		f.Keys = append(f.Keys, sk)
	}
	return k.commit(f)
}

// PublicKeys exports this process's own public keys (signing and retired
// but still verifying), for publication to other nodes.
func (k *Keyring) PublicKeys() JWKS {
	return k.export(func(sk storedKey) bool { return !sk.Trusted })
}

// VerificationKeys exports every key this process accepts, own and trusted.
func (k *Keyring) VerificationKeys() JWKS {
	return k.export(func(storedKey) bool { return true })
}

func (k *Keyring) export(keep func(storedKey) bool) JWKS {
	set := JWKS{Keys: []JWK{}}
	for _, sk := range k.cur.Load().file.Keys {
		if keep(sk) {
			set.Keys = append(set.Keys, JWK{
				Kty: "OKP", Crv: "Ed25519", Alg: "EdDSA", Use: "sig",
				Kid: sk.KID, X: base64.RawURLEncoding.EncodeToString(sk.Public),
			})
		}
	}
	return set
}

func cloneFile(f keyFile) keyFile {
	f.Keys = slices.Clone(f.Keys)
	return f
}

// JWK is an Ed25519 public key in RFC 8037 JSON Web Key form.
type JWK struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	X   string `json:"x"`
	Kid string `json:"kid"`
	Alg string `json:"alg,omitempty"`
	Use string `json:"use,omitempty"`
}

// JWKS is a JSON Web Key Set.
type JWKS struct {
	Keys []JWK `json:"keys"`
}

func (j JWK) publicKey() (ed25519.PublicKey, error) {
	if j.Kty != "OKP" || j.Crv != "Ed25519" {
		return nil, fmt.Errorf("unsupported key type %s/%s, want OKP/Ed25519", j.Kty, j.Crv)
	}
	if j.Alg != "" && j.Alg != "EdDSA" {
		return nil, fmt.Errorf("unsupported alg %q", j.Alg)
	}
	if j.Use != "" && j.Use != "sig" {
		return nil, fmt.Errorf("unsupported use %q", j.Use)
	}
	if j.Kid == "" {
		return nil, errors.New("missing kid")
	}
	pub, err := base64.RawURLEncoding.DecodeString(j.X)
	if err != nil || len(pub) != ed25519.PublicKeySize {
		return nil, errors.New("x is not a base64url Ed25519 public key")
	}
	return pub, nil
}
