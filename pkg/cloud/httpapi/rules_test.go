package httpapi

import (
	"net/http"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/service"
)

// TestRulesRoutes: the rule routes need the service token, refuse a bad
// name or a body naming another rule, and map a missing rule to 404.
func TestRulesRoutes(t *testing.T) {
	f := &fakeService{}
	s := newServer(t, f, Config{})
	call(t, s, http.MethodGet, "/api/v1/rules", "", nil).wantError(t, 401, "")
	if a := call(t, s, http.MethodGet, "/api/v1/rules", apiToken, nil); a.status != 200 {
		t.Fatalf("list: %d %s", a.status, a.raw)
	}
	call(t, s, http.MethodPut, "/api/v1/rules/a%2Fb", apiToken, []byte(`{"when":"x > 1"}`)).wantError(t, 400, badRuleName)
	call(t, s, http.MethodPut, "/api/v1/rules/hot", apiToken, []byte(`{"name":"cold","when":"x > 1"}`)).wantError(t, 400, `the body names rule "cold", the path "hot"`)
	call(t, s, http.MethodPut, "/api/v1/rules/hot", apiToken, []byte(`{"when":"x > 1","bogus":1}`)).wantError(t, 400, "")
	if a := call(t, s, http.MethodPut, "/api/v1/rules/hot", apiToken, []byte(`{"when":"x > 1","region":"north"}`)); a.status != 200 {
		t.Fatalf("put: %d %s", a.status, a.raw)
	}
	f.err = service.ErrNotFound
	call(t, s, http.MethodDelete, "/api/v1/rules/hot", apiToken, nil).wantError(t, 404, "rule hot not found")
}
