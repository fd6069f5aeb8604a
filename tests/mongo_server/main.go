// Command mongo-test-server runs FerretDB embedded in-process on 127.0.0.1 so
// that the Model Service's MongoDB backend is tested against a real MongoDB
// wire-protocol server without a MongoDB installation.
//
// It prints one line "ready <mongodb uri>" on stdout once it accepts
// connections and stops cleanly on SIGTERM or SIGINT. The data directory
// survives a stop, so a fault test can stop and restart the server on the
// same address and find its data again.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "TCP address to listen on (loopback only)")
	dir := flag.String("dir", "", "directory for the SQLite databases (required with -handler sqlite)")
	handler := flag.String("handler", "sqlite", "FerretDB handler: sqlite or postgresql")
	pgURL := flag.String("postgresql-url", "", "PostgreSQL URL for -handler postgresql")
	logLevel := flag.String("log-level", "error", "FerretDB log level: debug, info, warn or error")
	flag.Parse()

	if err := run(*addr, *dir, *handler, *pgURL, *logLevel); err != nil {
		fmt.Fprintln(os.Stderr, "mongo-test-server:", err)
		os.Exit(1)
	}
}

func run(addr, dir, handler, pgURL, logLevel string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("bad -addr %q: %w", addr, err)
	}
	// Load and fault tests must only ever target this machine.
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-addr %q is not a loopback address", addr)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("bad -log-level %q: %w", logLevel, err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	conf := &ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: addr},
		Logger:   logger,
		Handler:  handler,
	}
	switch handler {
	case "sqlite":
		if dir == "" {
			return fmt.Errorf("-dir is required with -handler sqlite")
		}
		abs, err := filepath.Abs(dir)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(abs, 0o755); err != nil {
			return err
		}
		// FerretDB wants a directory URI that ends with a slash.
		conf.SQLiteURL = "file:" + abs + "/"
	case "postgresql":
		if pgURL == "" {
			return fmt.Errorf("-postgresql-url is required with -handler postgresql")
		}
		conf.PostgreSQLURL = pgURL
	default:
		return fmt.Errorf("unknown -handler %q", handler)
	}

	f, err := ferretdb.New(conf)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()

	// MongoDBURI needs the listener that Run starts; ask for it only after a
	// TCP connection succeeds, so "ready" really means ready.
	uri := f.MongoDBURI()
	hostPort := uri[len("mongodb://") : len(uri)-1]
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", hostPort, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("listener on %s did not come up: %w", hostPort, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("ready %s\n", uri)

	return <-done
}
