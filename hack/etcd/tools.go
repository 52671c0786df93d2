//go:build tools

// Package tools pins the etcd server's main package in this module's dependencies.
package tools

import _ "go.etcd.io/etcd/server/v3"
