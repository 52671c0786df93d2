//go:build tools

// Package tools pins the krew commands hack/build-krew.sh builds from this module's
// requirements: krew (installed as the kubectl plugin kubectl-krew) and
// validate-krew-manifest (what the krew-index's CI runs on a manifest).
package tools

import (
	_ "sigs.k8s.io/krew/cmd/krew"
	_ "sigs.k8s.io/krew/cmd/validate-krew-manifest"
)
