// Package differential holds the differential test of the edge store against
// the cloud state machine: the same last-writer-wins changes, delivered in
// different orders, must leave both in the same state. It has no code of its
// own; the test lives here because it imports both pkg/store and
// pkg/cloud/fsm, which no production package may do.
package differential
