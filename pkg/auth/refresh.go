package auth

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Errors from refresh-token operations; all mean 401 to a client.
var (
	// ErrRefreshNotFound: the token was never issued here (or has been
	// purged). An edge may forward such a token to the cloud that issued it.
	ErrRefreshNotFound = errors.New("auth: unknown refresh token")
	ErrRefreshExpired  = errors.New("auth: refresh token expired")
	ErrRefreshRevoked  = errors.New("auth: refresh token revoked")
	// ErrRefreshReused: an already-rotated token was presented again, which
	// means it was copied; the whole family has been revoked.
	ErrRefreshReused = errors.New("auth: refresh token reused; session revoked")
)

// Bucket names. The database is shared with the rest of the process; this
// package touches only buckets with the auth_ prefix.
var (
	bucketRefresh  = []byte("auth_refresh")        // sha256(token) -> refreshRecord
	bucketFamilies = []byte("auth_refresh_fam")    // family id -> familyRecord
	bucketUserFams = []byte("auth_refresh_user")   // openid 0x00 family -> nil
	bucketExpiry   = []byte("auth_refresh_expiry") // be64(expiry unix ns) sha256(token) -> nil
	// bucketRevoked lists revoked families whose access tokens may still be
	// live: family -> be64(unix ns until which they must be refused).
	bucketRevoked = []byte("auth_refresh_revoked")
)

type refreshRecord struct {
	Family  string    `json:"f"`
	OpenID  string    `json:"o"`
	Expires time.Time `json:"e"`
	Used    bool      `json:"u,omitempty"`
}

type familyRecord struct {
	OpenID  string    `json:"o"`
	Current []byte    `json:"c"` // hash of the newest, unused token
	Revoked bool      `json:"r,omitempty"`
	Created time.Time `json:"t"`
	// The last rotation, for the reuse grace: the hash of the token it
	// consumed, when, and the pair it handed out sealed with a key only
	// that token yields (sealPair), so a copy of the database opens
	// nothing.
	Prev      []byte    `json:"p,omitempty"`
	RotatedAt time.Time `json:"ra,omitempty"`
	Sealed    []byte    `json:"s,omitempty"`
}

// refreshStore keeps refresh tokens as SHA-256 hashes, so a copy of the
// database grants nothing. Hashing without a salt is sound here because the
// tokens are 256-bit random values, not guessable secrets.
type refreshStore struct {
	db *bolt.DB
}

func newRefreshStore(db *bolt.DB) (*refreshStore, error) {
	err := db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketRefresh, bucketFamilies, bucketUserFams, bucketExpiry, bucketRevoked} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("create bucket %s: %w", b, err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("auth: refresh store: %w", err)
	}
	return &refreshStore{db: db}, nil
}

func hashToken(tok string) []byte {
	h := sha256.Sum256([]byte(tok))
	return h[:]
}

func expiryKey(exp time.Time, hash []byte) []byte {
	k := make([]byte, 8, 8+len(hash))
	binary.BigEndian.PutUint64(k, uint64(exp.UnixNano()))
	return append(k, hash...)
}

func userFamKey(openid, family string) []byte {
	return append(append([]byte(openid), 0), family...)
}

// put stores a new token record (and its family's pointer to it) in tx.
func putToken(tx *bolt.Tx, hash []byte, rec refreshRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	if err := tx.Bucket(bucketRefresh).Put(hash, b); err != nil {
		return err
	}
	return tx.Bucket(bucketExpiry).Put(expiryKey(rec.Expires, hash), nil)
}

func getJSON(b *bolt.Bucket, key []byte, v any) (bool, error) {
	raw := b.Get(key)
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("decode %x: %w", key, err)
	}
	return true, nil
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, raw)
}

// create starts a new family for openid with its first token.
func (s *refreshStore) create(openid, token, family string, now, expires time.Time) error {
	hash := hashToken(token)
	err := s.db.Update(func(tx *bolt.Tx) error {
		if err := putToken(tx, hash, refreshRecord{Family: family, OpenID: openid, Expires: expires}); err != nil {
			return err
		}
		if err := putJSON(tx.Bucket(bucketFamilies), []byte(family), familyRecord{OpenID: openid, Current: hash, Created: now}); err != nil {
			return err
		}
		return tx.Bucket(bucketUserFams).Put(userFamKey(openid, family), nil)
	})
	if err != nil {
		return fmt.Errorf("auth: store refresh token: %w", err)
	}
	return nil
}

// rotate consumes old and, in the same transaction, stores the refresh
// token of the pair issue signs as its successor. bbolt serialises
// read-write transactions, so of two concurrent rotations of one token
// exactly one rotates; the other sees it used. A used token is a reuse,
// which revokes the family (its access tokens to be refused until
// refuseUntil), unless it is the token the family's last rotation consumed
// and that rotation is at most grace old (a client retrying a refresh whose
// answer it lost): then the pair that rotation issued is returned again,
// replayed true. It returns the session (family) in every case.
func (s *refreshStore) rotate(old string, now, expires, refuseUntil time.Time, grace time.Duration,
	issue func(openid, family string) (Pair, error)) (pair Pair, family string, replayed bool, err error) {
	oldHash := hashToken(old)
	var reused bool
	err = s.db.Update(func(tx *bolt.Tx) error {
		reused, replayed = false, false
		tokens, fams := tx.Bucket(bucketRefresh), tx.Bucket(bucketFamilies)
		var rec refreshRecord
		if ok, err := getJSON(tokens, oldHash, &rec); err != nil {
			return err
		} else if !ok {
			return ErrRefreshNotFound
		}
		var fam familyRecord
		if ok, err := getJSON(fams, []byte(rec.Family), &fam); err != nil {
			return err
		} else if !ok {
			return ErrRefreshNotFound
		}
		family = rec.Family
		if fam.Revoked {
			return ErrRefreshRevoked
		}
		if rec.Used {
			if withinGrace(fam, oldHash, now, grace) {
				if p, err := openPair(old, fam.Sealed); err == nil {
					pair, replayed = p, true
					return nil
				}
			}
			// Commit the revocation, then report the reuse.
			reused = true
			return revokeFamily(tx, rec.Family, refuseUntil)
		}
		if !now.Before(rec.Expires) {
			return ErrRefreshExpired
		}
		p, err := issue(rec.OpenID, rec.Family)
		if err != nil {
			return err
		}
		sealed, err := sealPair(old, p)
		if err != nil {
			return err
		}
		rec.Used = true
		if err := putJSON(tokens, oldHash, rec); err != nil {
			return err
		}
		nextHash := hashToken(p.RefreshToken)
		if err := putToken(tx, nextHash, refreshRecord{Family: rec.Family, OpenID: rec.OpenID, Expires: expires}); err != nil {
			return err
		}
		fam.Current, fam.Prev, fam.RotatedAt, fam.Sealed = nextHash, oldHash, now, sealed
		pair = p
		return putJSON(fams, []byte(rec.Family), fam)
	})
	if reused && err == nil {
		return Pair{}, family, false, ErrRefreshReused
	}
	if err != nil {
		if isRefreshSentinel(err) {
			return Pair{}, family, false, err
		}
		return Pair{}, "", false, fmt.Errorf("auth: rotate refresh token: %w", err)
	}
	return pair, family, replayed, nil
}

// withinGrace is the reuse grace: the presented (used) token is the one
// the family's last rotation consumed, that rotation's successor is still
// the family's current token (it has not been used in turn: a client that
// used it has its answer), and it happened at most grace before now.
func withinGrace(fam familyRecord, presented []byte, now time.Time, grace time.Duration) bool {
	return grace > 0 && len(fam.Sealed) > 0 && bytes.Equal(fam.Prev, presented) &&
		!now.Before(fam.RotatedAt) && now.Sub(fam.RotatedAt) <= grace
}

// sealPair encrypts the pair a rotation issued (AES-256-GCM) under a key
// derived from the token it consumed, so that only a holder of that token
// can have it again; the database keeps no token in the clear.
func sealPair(consumed string, p Pair) ([]byte, error) {
	aead, err := graceAEAD(consumed)
	if err != nil {
		return nil, err
	}
	plain, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("auth: random: %w", err)
	}
	return aead.Seal(nonce, nonce, plain, nil), nil
}

func openPair(consumed string, sealed []byte) (Pair, error) {
	aead, err := graceAEAD(consumed)
	if err != nil {
		return Pair{}, err
	}
	if len(sealed) < aead.NonceSize() {
		return Pair{}, errors.New("auth: sealed pair too short")
	}
	plain, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], nil)
	if err != nil {
		return Pair{}, fmt.Errorf("auth: open sealed pair: %w", err)
	}
	var p Pair
	if err := json.Unmarshal(plain, &p); err != nil {
		return Pair{}, fmt.Errorf("auth: decode sealed pair: %w", err)
	}
	return p, nil
}

func graceAEAD(consumed string) (cipher.AEAD, error) {
	// Domain-separated from hashToken (the lookup key stored beside it).
	key := sha256.Sum256([]byte("outpost refresh reuse grace v1\x00" + consumed))
	block, err := aes.NewCipher(key[:])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

func isRefreshSentinel(err error) bool {
	return errors.Is(err, ErrRefreshNotFound) || errors.Is(err, ErrRefreshExpired) ||
		errors.Is(err, ErrRefreshRevoked) || errors.Is(err, ErrRefreshReused)
}

// revokeToken revokes the family the token belongs to (logout) and returns
// it.
func (s *refreshStore) revokeToken(token string, refuseUntil time.Time) (string, error) {
	hash := hashToken(token)
	var family string
	err := s.db.Update(func(tx *bolt.Tx) error {
		var rec refreshRecord
		if ok, err := getJSON(tx.Bucket(bucketRefresh), hash, &rec); err != nil {
			return err
		} else if !ok {
			return ErrRefreshNotFound
		}
		family = rec.Family
		return revokeFamily(tx, rec.Family, refuseUntil)
	})
	if err != nil && !errors.Is(err, ErrRefreshNotFound) {
		return "", fmt.Errorf("auth: revoke refresh token: %w", err)
	}
	return family, err
}

// revokeFamily revokes a family and lists it among those whose access
// tokens are refused until refuseUntil. Revoking an unknown family only
// lists it: a session another service started (a cloud session an edge
// saw revoked) is refused all the same.
func revokeFamily(tx *bolt.Tx, family string, refuseUntil time.Time) error {
	if err := putRevoked(tx, family, refuseUntil); err != nil {
		return err
	}
	fams := tx.Bucket(bucketFamilies)
	var fam familyRecord
	if ok, err := getJSON(fams, []byte(family), &fam); err != nil || !ok {
		return err
	}
	if fam.Revoked {
		return nil
	}
	fam.Revoked = true
	return putJSON(fams, []byte(family), fam)
}

func putRevoked(tx *bolt.Tx, family string, until time.Time) error {
	b := tx.Bucket(bucketRevoked)
	if old := b.Get([]byte(family)); len(old) == 8 && int64(binary.BigEndian.Uint64(old)) >= until.UnixNano() {
		return nil
	}
	return b.Put([]byte(family), binary.BigEndian.AppendUint64(nil, uint64(until.UnixNano())))
}

// revokeSession lists family as revoked until refuseUntil (and revokes it
// if it is one of this store's).
func (s *refreshStore) revokeSession(family string, refuseUntil time.Time) error {
	err := s.db.Update(func(tx *bolt.Tx) error { return revokeFamily(tx, family, refuseUntil) })
	if err != nil {
		return fmt.Errorf("auth: revoke session: %w", err)
	}
	return nil
}

// revokeUser revokes every live family of openid, found through the
// per-user index rather than a scan of all tokens, and returns them.
func (s *refreshStore) revokeUser(openid string, refuseUntil time.Time) ([]string, error) {
	var families []string
	err := s.db.Update(func(tx *bolt.Tx) error {
		families = families[:0]
		prefix := append([]byte(openid), 0)
		c := tx.Bucket(bucketUserFams).Cursor()
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			family := string(k[len(prefix):])
			if err := revokeFamily(tx, family, refuseUntil); err != nil {
				return err
			}
			families = append(families, family)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("auth: revoke user %q: %w", openid, err)
	}
	return families, nil
}

// revokedFamilies returns the listed revoked families still to be refused
// at now, deleting those past their time.
func (s *refreshStore) revokedFamilies(now time.Time) (map[string]time.Time, error) {
	out := map[string]time.Time{}
	err := s.db.Update(func(tx *bolt.Tx) error {
		clear(out)
		b := tx.Bucket(bucketRevoked)
		var done [][]byte
		err := b.ForEach(func(k, v []byte) error {
			until := time.Time{}
			if len(v) == 8 {
				until = time.Unix(0, int64(binary.BigEndian.Uint64(v)))
			}
			if !now.Before(until) {
				done = append(done, bytes.Clone(k))
				return nil
			}
			out[string(k)] = until
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range done {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("auth: revoked sessions: %w", err)
	}
	return out, nil
}

// purge deletes token records that expired before now, walking the expiry
// index from its oldest end so the cost is proportional to what is removed.
// A family goes with its newest token: every older token of the family
// expired no later than that one. At most limit records go per call, to keep
// each write transaction short.
func (s *refreshStore) purge(now time.Time, limit int) (int, error) {
	n := 0
	err := s.db.Update(func(tx *bolt.Tx) error {
		n = 0
		exp, tokens, fams := tx.Bucket(bucketExpiry), tx.Bucket(bucketRefresh), tx.Bucket(bucketFamilies)
		users := tx.Bucket(bucketUserFams)
		c := exp.Cursor()
		cutoff := uint64(now.UnixNano())
		for k, _ := c.First(); k != nil && n < limit; k, _ = c.First() {
			if len(k) < 8 || binary.BigEndian.Uint64(k[:8]) > cutoff {
				break
			}
			hash := bytes.Clone(k[8:])
			if err := exp.Delete(k); err != nil {
				return err
			}
			var rec refreshRecord
			ok, err := getJSON(tokens, hash, &rec)
			if err != nil {
				return err
			}
			if !ok {
				continue
			}
			if err := tokens.Delete(hash); err != nil {
				return err
			}
			n++
			var fam familyRecord
			if ok, err := getJSON(fams, []byte(rec.Family), &fam); err != nil {
				return err
			} else if ok && bytes.Equal(fam.Current, hash) {
				if err := fams.Delete([]byte(rec.Family)); err != nil {
					return err
				}
				if err := users.Delete(userFamKey(fam.OpenID, rec.Family)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("auth: purge refresh tokens: %w", err)
	}
	return n, nil
}
