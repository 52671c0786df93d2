// Command gitops-health tells what the two GitOps tools would say of BlockCopy objects:
//
//   - Flux: kstatus, sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute (Flux's health checks and
//     `wait: true` call the same function, from its fork github.com/fluxcd/cli-utils, whose
//     status package is identical);
//   - Argo CD: a resource health script (deploy/argocd/blockcopy-health.lua) run in
//     github.com/yuin/gopher-lua in a state set up as Argo CD sets one up for a health script
//     from argocd-cm (util/lua/lua.go in argoproj/argo-cd): only the package, base and table
//     libraries, `os` only through require("os") with time and date, a 1 s deadline, the
//     object as the global `obj` (numbers as Lua numbers), and the returned table read as
//     {status, message}; a status outside Argo CD's set becomes Unknown.
//
// Usage: gitops-health -lua SCRIPT [-open-libs] < objects.json
//
// stdin holds one object or a JSON list of objects; stdout gets a JSON list with, per object,
// {"kstatus": {"status", "message"}, "argocd": {"status", "message"}} ("error" set when the
// tool itself failed on the object, as Argo CD shows an Unknown health with the error text).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// scriptTimeout is Argo CD's deadline for one script run.
const scriptTimeout = time.Second

// argoHealthCodes are the statuses Argo CD accepts from a script; any other is Unknown.
var argoHealthCodes = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true,
	"Missing": true, "Unknown": true,
}

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

type result struct {
	Kstatus verdict `json:"kstatus"`
	ArgoCD  verdict `json:"argocd"`
}

func main() {
	scriptPath := flag.String("lua", "", "the Argo CD health script to run")
	openLibs := flag.Bool("open-libs", false,
		"open every standard library (argocd-cm resource.customizations.useOpenLibs.<kind>: true)")
	flag.Parse()
	if *scriptPath == "" {
		fmt.Fprintln(os.Stderr, "usage: gitops-health -lua SCRIPT [-open-libs] < objects.json")
		os.Exit(2)
	}
	script, err := os.ReadFile(*scriptPath)
	if err != nil {
		fatal(err)
	}
	objects, err := readObjects(os.Stdin)
	if err != nil {
		fatal(err)
	}
	results := make([]result, 0, len(objects))
	for _, obj := range objects {
		u := &unstructured.Unstructured{Object: obj}
		results = append(results, result{
			Kstatus: kstatusOf(u),
			ArgoCD:  argoHealthOf(u, string(script), *openLibs),
		})
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(results); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "gitops-health:", err)
	os.Exit(1)
}

// readObjects decodes stdin as the API machinery does for unstructured objects: whole numbers
// become int64 (what kstatus' NestedInt64 and Argo CD's conversion see from a live object).
func readObjects(r io.Reader) ([]map[string]any, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	var decoded any
	if err := utiljson.Unmarshal(data, &decoded); err != nil {
		return nil, err
	}
	switch v := decoded.(type) {
	case map[string]any:
		return []map[string]any{v}, nil
	case []any:
		objects := make([]map[string]any, 0, len(v))
		for i, item := range v {
			obj, ok := item.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("item %d is not an object", i)
			}
			objects = append(objects, obj)
		}
		return objects, nil
	}
	return nil, errors.New("stdin holds neither an object nor a list of objects")
}

func kstatusOf(u *unstructured.Unstructured) verdict {
	res, err := status.Compute(u)
	if err != nil {
		return verdict{Status: string(status.UnknownStatus), Message: err.Error(), Error: err.Error()}
	}
	return verdict{Status: string(res.Status), Message: res.Message}
}

// argoHealthOf is what Argo CD's controller shows for the object with this script as its
// health customization.
func argoHealthOf(u *unstructured.Unstructured, script string, openLibs bool) verdict {
	// gitops-engine answers before any script for an object being deleted (unless it carries
	// Argo CD's hook finalizer, which a BlockCopy never does).
	if u.GetDeletionTimestamp() != nil {
		return verdict{Status: "Progressing", Message: "Pending deletion"}
	}
	v, err := runHealthScript(u.Object, script, openLibs)
	if err != nil {
		return verdict{Status: "Unknown", Message: err.Error(), Error: err.Error()}
	}
	return v
}

func runHealthScript(obj map[string]any, script string, openLibs bool) (verdict, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	defer L.Close()
	// The libraries Argo CD opens whatever useOpenLibs says, each opener called with its name.
	for _, lib := range []struct {
		name   string
		opener lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.opener), Protect: true},
			lua.LString(lib.name)); err != nil {
			return verdict{}, err
		}
	}
	// Argo CD's restricted os (time and date only) is reachable through require("os") alone:
	// its opener registers under the name of the table library, which is already loaded, so
	// it adds no global. Those two functions are gopher-lua's own, taken from its os library.
	L.PreloadModule(lua.OsLibName, restrictedOsLoader)
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("actionParams", L.NewTable())
	L.SetGlobal("obj", toLua(L, obj))

	fn, err := L.LoadString(script)
	if err != nil {
		return verdict{}, err
	}
	L.Push(fn)
	if err := L.PCall(0, lua.MultRet, nil); err != nil {
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = "" // Argo CD shows the error without Lua's stack trace
		}
		return verdict{}, err
	}
	switch ret := L.Get(-1).(type) {
	case *lua.LTable:
		return healthFromTable(ret)
	case *lua.LNilType:
		return verdict{}, nil // Argo CD: an empty health (no status)
	default:
		return verdict{}, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
}

// healthFromTable reads {status = ..., message = ...} the way Argo CD's JSON round trip does:
// both must be strings (or absent); an unknown status code is reported as Unknown.
func healthFromTable(t *lua.LTable) (verdict, error) {
	var v verdict
	for key, dst := range map[string]*string{"status": &v.Status, "message": &v.Message} {
		switch value := t.RawGetString(key).(type) {
		case lua.LString:
			*dst = string(value)
		case *lua.LNilType:
		default:
			return verdict{}, fmt.Errorf("health %s is a %s, not a string", key, value.Type())
		}
	}
	if !argoHealthCodes[v.Status] {
		return verdict{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return v, nil
}

func restrictedOsLoader(L *lua.LState) int {
	full := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer full.Close()
	full.Push(full.NewFunction(lua.OpenOs))
	full.Call(0, 1)
	osLib := full.Get(-1).(*lua.LTable)
	mod := L.NewTable()
	for _, name := range []string{"time", "date"} {
		mod.RawSetString(name, L.NewFunction(osLib.RawGetString(name).(*lua.LFunction).GFunction))
	}
	L.Push(mod)
	return 1
}

// toLua converts a decoded JSON value as Argo CD does: numbers (int64 or float64) become Lua
// numbers, lists become sequences, objects become tables keyed by string, null becomes nil.
func toLua(L *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case json.Number:
		return lua.LString(v)
	case []any:
		t := L.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(L, item))
		}
		return t
	case map[string]any:
		t := L.CreateTable(0, len(v))
		for key, item := range v {
			t.RawSetH(lua.LString(key), toLua(L, item))
		}
		return t
	}
	return lua.LNil
}
