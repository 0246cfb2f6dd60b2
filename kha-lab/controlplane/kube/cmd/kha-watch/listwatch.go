// This file holds kha-watch's JSON-lines output and the ListWatch and
// watch.Interface wrappers that report what the reflectors do: each list
// call, each watch start, and each watch that ends or carries an error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// record is one output line; empty fields are left out.
type record struct {
	TS      string `json:"ts"`
	Event   string `json:"event"`
	Kind    string `json:"kind,omitempty"`
	Object  string `json:"object,omitempty"` // namespace/name
	RV      string `json:"rv,omitempty"`
	Initial bool   `json:"initial,omitempty"` // an add from the initial list
	Items   *int   `json:"items,omitempty"`
	Options string `json:"options,omitempty"`
	Addr    string `json:"addr,omitempty"`
	Local   string `json:"local,omitempty"`
	Remote  string `json:"remote,omitempty"`
	Method  string `json:"method,omitempty"`
	URL     string `json:"url,omitempty"`
	Status  int    `json:"status,omitempty"`
	Proto   string `json:"proto,omitempty"`
	Error   string `json:"error,omitempty"`
}

var (
	outMu sync.Mutex
	out   = json.NewEncoder(os.Stdout)
)

func emit(r record) {
	r.TS = time.Now().UTC().Format(time.RFC3339Nano)
	outMu.Lock()
	defer outMu.Unlock()
	_ = out.Encode(r)
}

// lister is what a typed client-go resource client offers, e.g. NodeInterface.
type lister[L runtime.Object] interface {
	List(ctx context.Context, opts metav1.ListOptions) (L, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}

func describe(o metav1.ListOptions) string {
	s := fmt.Sprintf("resourceVersion=%q", o.ResourceVersion)
	if o.ResourceVersionMatch != "" {
		s += " resourceVersionMatch=" + string(o.ResourceVersionMatch)
	}
	if o.TimeoutSeconds != nil {
		s += fmt.Sprintf(" timeoutSeconds=%d", *o.TimeoutSeconds)
	}
	if o.SendInitialEvents != nil && *o.SendInitialEvents {
		s += " sendInitialEvents=true" // a WatchList: the (re)list comes as a watch
	}
	if o.Limit != 0 {
		s += fmt.Sprintf(" limit=%d", o.Limit)
	}
	return s
}

// loggedListWatch wraps c's List and Watch to report each call and its result.
func loggedListWatch[L runtime.Object](kind string, c lister[L]) *cache.ListWatch {
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			emit(record{Event: "list", Kind: kind, Options: describe(o)})
			obj, err := c.List(ctx, o)
			if err != nil {
				emit(record{Event: "list_error", Kind: kind, Error: err.Error()})
				return nil, err
			}
			r := record{Event: "list_done", Kind: kind}
			if n := meta.LenList(obj); n >= 0 {
				r.Items = &n
			}
			if m, err := meta.ListAccessor(obj); err == nil {
				r.RV = m.GetResourceVersion()
			}
			emit(r)
			return obj, nil
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := c.Watch(ctx, o)
			if err != nil {
				emit(record{Event: "watch_open_error", Kind: kind, Options: describe(o), Error: err.Error()})
				return nil, err
			}
			emit(record{Event: "watch_start", Kind: kind, Options: describe(o)})
			return newLoggedWatch(ctx, kind, w), nil
		},
	}
}

// loggedWatch forwards a watch's events, reporting error events and the end of
// the stream: "watch_end" when the result channel closed by itself (server
// timeout, broken connection, apiserver gone) and "watch_stop" when the
// reflector stopped it or its context ended.
type loggedWatch struct {
	ctx   context.Context
	inner watch.Interface
	kind  string
	ch    chan watch.Event
	stop  chan struct{}
	once  sync.Once
}

func newLoggedWatch(ctx context.Context, kind string, inner watch.Interface) *loggedWatch {
	w := &loggedWatch{ctx: ctx, inner: inner, kind: kind, ch: make(chan watch.Event), stop: make(chan struct{})}
	go w.forward()
	return w
}

func (w *loggedWatch) forward() {
	defer close(w.ch)
	for ev := range w.inner.ResultChan() {
		switch {
		case w.stopped():
			// An error event after Stop is the stream closing under the
			// decoder ("http2: response body closed"), not news.
		case ev.Type == watch.Error:
			emit(record{Event: "watch_error_event", Kind: w.kind, Error: apierrors.FromObject(ev.Object).Error()})
		case ev.Type == watch.Bookmark:
			if m, err := meta.Accessor(ev.Object); err == nil {
				emit(record{Event: "bookmark", Kind: w.kind, RV: m.GetResourceVersion()})
			}
		}
		select {
		case w.ch <- ev:
		case <-w.stop:
			emit(record{Event: "watch_stop", Kind: w.kind})
			return
		}
	}
	if w.stopped() {
		emit(record{Event: "watch_stop", Kind: w.kind})
	} else {
		emit(record{Event: "watch_end", Kind: w.kind})
	}
}

func (w *loggedWatch) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return w.ctx.Err() != nil
	}
}

func (w *loggedWatch) Stop() {
	w.once.Do(func() {
		close(w.stop)
		w.inner.Stop()
	})
}

func (w *loggedWatch) ResultChan() <-chan watch.Event { return w.ch }
