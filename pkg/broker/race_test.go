//go:build race

package broker

// raceEnabled: the race detector slows bcrypt about tenfold, which timing
// bounds must allow for.
const raceEnabled = true
