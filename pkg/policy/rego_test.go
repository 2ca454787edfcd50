package policy

import (
	"context"
	"testing"

	"github.com/open-policy-agent/opa/v1/tester"
)

// policiesDir is the repository's policy directory, relative to this package.
const policiesDir = "../../policies"

// TestRegoUnitTests runs the *_test.rego suites next to the policies, so that
// `go test ./...` fails when a Rego test fails.
func TestRegoUnitTests(t *testing.T) {
	results, err := tester.Run(context.Background(), policiesDir)
	if err != nil {
		t.Fatalf("run rego tests: %v", err)
	}
	if len(results) == 0 {
		t.Fatal("no rego tests found")
	}
	for _, r := range results {
		t.Run(r.Package+"."+r.Name, func(t *testing.T) {
			switch {
			case r.Error != nil:
				t.Fatalf("%s: error: %v", r.Location, r.Error)
			case r.Fail:
				t.Fatalf("%s: FAIL", r.Location)
			case r.Skip:
				t.Skip("todo_ test")
			}
		})
	}
}
