// Package exprlang measures the two candidate expression languages for
// pkg/rules on its hot path: one compiled condition evaluated against one
// reading's metrics and the device's tags. It is its own module so that the
// losing library never becomes a dependency of Outpost. Run it with
// `make bench-exprlang`.
package exprlang

import (
	"testing"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/vm"
	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
)

// A condition of the shape rules take: two metrics and a tag.
const (
	exprSrc = `temp > 30.0 && humidity < 80.0 && device.tags.site == "lab"`
	celSrc  = `temp > 30.0 && humidity < 80.0 && device.tags.site == "lab"`
)

type reading struct {
	metrics map[string]float64
	tags    map[string]string
}

var sample = reading{
	metrics: map[string]float64{"temp": 31.5, "humidity": 40, "battery": 3.1},
	tags:    map[string]string{"site": "lab", "floor": "2"},
}

// BenchmarkExpr: expr-lang/expr, environment a reused map (the engine
// evaluates on one goroutine, so it refills one map per reading).
func BenchmarkExpr(b *testing.B) {
	env := map[string]any{}
	prog, err := expr.Compile(exprSrc, expr.AllowUndefinedVariables(), expr.AsBool())
	if err != nil {
		b.Fatal(err)
	}
	var machine vm.VM
	b.ReportAllocs()
	for b.Loop() {
		clear(env)
		for k, v := range sample.metrics {
			env[k] = v
		}
		env["device"] = map[string]any{"id": "dev-1", "tags": sample.tags}
		out, err := machine.Run(prog, env)
		if err != nil || out != true {
			b.Fatal(out, err)
		}
	}
}

// BenchmarkCEL: google/cel-go, metrics declared as doubles (CEL needs
// declarations: the engine would declare every identifier the rule names),
// activation a reused map.
func BenchmarkCEL(b *testing.B) {
	env, err := cel.NewEnv(
		cel.Variable("temp", cel.DoubleType),
		cel.Variable("humidity", cel.DoubleType),
		cel.Variable("device", cel.MapType(cel.StringType, cel.DynType)),
	)
	if err != nil {
		b.Fatal(err)
	}
	ast, iss := env.Compile(celSrc)
	if iss.Err() != nil {
		b.Fatal(iss.Err())
	}
	prg, err := env.Program(ast, cel.EvalOptions(cel.OptOptimize))
	if err != nil {
		b.Fatal(err)
	}
	act := map[string]any{}
	b.ReportAllocs()
	for b.Loop() {
		clear(act)
		for k, v := range sample.metrics {
			act[k] = v
		}
		act["device"] = map[string]any{"id": "dev-1", "tags": sample.tags}
		out, _, err := prg.Eval(act)
		if err != nil || out != types.True {
			b.Fatal(out, err)
		}
	}
}

// BenchmarkCompileExpr and BenchmarkCompileCEL: what a rule update costs.
func BenchmarkCompileExpr(b *testing.B) {
	for b.Loop() {
		if _, err := expr.Compile(exprSrc, expr.AllowUndefinedVariables(), expr.AsBool()); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkCompileCEL(b *testing.B) {
	env, _ := cel.NewEnv(
		cel.Variable("temp", cel.DoubleType),
		cel.Variable("humidity", cel.DoubleType),
		cel.Variable("device", cel.MapType(cel.StringType, cel.DynType)),
	)
	for b.Loop() {
		ast, iss := env.Compile(celSrc)
		if iss.Err() != nil {
			b.Fatal(iss.Err())
		}
		if _, err := env.Program(ast, cel.EvalOptions(cel.OptOptimize)); err != nil {
			b.Fatal(err)
		}
	}
}

// The evaluations alone, environment built once: what each VM costs.
func BenchmarkExprEvalOnly(b *testing.B) {
	env := map[string]any{"temp": 31.5, "humidity": 40.0, "device": map[string]any{"id": "dev-1", "tags": sample.tags}}
	prog, err := expr.Compile(exprSrc, expr.AllowUndefinedVariables(), expr.AsBool())
	if err != nil {
		b.Fatal(err)
	}
	var machine vm.VM
	b.ReportAllocs()
	for b.Loop() {
		if out, err := machine.Run(prog, env); err != nil || out != true {
			b.Fatal(out, err)
		}
	}
}

func BenchmarkCELEvalOnly(b *testing.B) {
	env, _ := cel.NewEnv(
		cel.Variable("temp", cel.DoubleType),
		cel.Variable("humidity", cel.DoubleType),
		cel.Variable("device", cel.MapType(cel.StringType, cel.DynType)),
	)
	ast, iss := env.Compile(celSrc)
	if iss.Err() != nil {
		b.Fatal(iss.Err())
	}
	prg, _ := env.Program(ast, cel.EvalOptions(cel.OptOptimize))
	act, _ := cel.NewActivation(map[string]any{"temp": 31.5, "humidity": 40.0, "device": map[string]any{"id": "dev-1", "tags": sample.tags}})
	b.ReportAllocs()
	for b.Loop() {
		if out, _, err := prg.Eval(act); err != nil || out != types.True {
			b.Fatal(out, err)
		}
	}
}

// expr with the referenced metrics declared as float64, as CEL needs them
// declared: the checker then emits typed comparisons.
func BenchmarkExprTypedEvalOnly(b *testing.B) {
	env := map[string]any{"temp": 31.5, "humidity": 40.0, "device": map[string]any{"id": "dev-1", "tags": sample.tags}}
	prog, err := expr.Compile(exprSrc, expr.Env(map[string]any{"temp": 0.0, "humidity": 0.0, "device": map[string]any{}}), expr.AsBool())
	if err != nil {
		b.Fatal(err)
	}
	var machine vm.VM
	b.ReportAllocs()
	for b.Loop() {
		if out, err := machine.Run(prog, env); err != nil || out != true {
			b.Fatal(out, err)
		}
	}
}
