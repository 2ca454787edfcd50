package auth

import "errors"

// ErrLoginUnavailable means no login path is reachable: neither the cloud an
// edge forwards logins to nor WeChat. Existing sessions keep working.
var ErrLoginUnavailable = errors.New("login unavailable")
