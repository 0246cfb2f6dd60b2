// kha-watch is a small client-go watcher for the kha lab. It talks to the
// apiserver the way kubelet and kube-proxy do (client certificate from a
// kubeconfig, HTTP/2, kubelet's client defaults, shared informers that list
// and watch) and prints one JSON object per line on stdout for every TCP
// connection, HTTP response, list, watch start, watch end or error, and object
// event, so that a test can see which apiserver a watch sits on and when it
// breaks and relists. As in kubelet 1.37, client-go's WatchListClient gate is
// on: an initial list or relist is a watch with sendInitialEvents=true, and the
// list call is made only if that fails (or with KUBE_FEATURE_WatchListClient=false).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

const maxDuration = time.Hour

func main() {
	kubeconfig := flag.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig with a client certificate")
	server := flag.String("server", "", "apiserver URL overriding the kubeconfig's, e.g. https://localhost:6443")
	namespace := flag.String("namespace", "default", "namespace of the watched services, endpointslices and configmaps")
	duration := flag.Duration("duration", 30*time.Second, "exit after this long (at most 1h)")
	flag.Parse()
	if *duration <= 0 || *duration > maxDuration {
		fmt.Fprintf(os.Stderr, "kha-watch: --duration must be in (0, %v]\n", maxDuration)
		os.Exit(2)
	}
	if err := run(*kubeconfig, *server, *namespace, *duration); err != nil {
		emit(record{Event: "fatal", Error: err.Error()})
		os.Exit(1)
	}
}

func run(kubeconfig, server, namespace string, duration time.Duration) error {
	cfg, err := clientcmd.BuildConfigFromFlags(server, kubeconfig)
	if err != nil {
		return err
	}
	// kubelet's client settings (cmd/kubelet/app/server.go, kubelet config
	// defaults): protobuf, QPS 50, burst 100, no overall request timeout on
	// the client that watches (only kubelet's separate heartbeat client has
	// one, min(nodeStatusUpdateFrequency 10s, nodeLeaseDuration 40s) = 10s).
	// The dialer is the one client-go and kubelet's connrotation use: 30s
	// connect timeout, 30s TCP keepalive. client-go adds TLS handshake
	// timeout 10s, idle connection timeout 90s and, for HTTP/2, ReadIdleTimeout
	// 30s and PingTimeout 15s (HTTP2_READ_IDLE_TIMEOUT_SECONDS,
	// HTTP2_PING_TIMEOUT_SECONDS); reflectors ask for watch timeouts random in
	// [5m, 10m] and back off 800ms..30s between failed lists/watches.
	cfg.ContentType = runtime.ContentTypeProtobuf
	cfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	cfg.QPS, cfg.Burst = 50, 100
	cfg.Timeout = 0
	cfg.UserAgent = "kha-watch"
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	cfg.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			emit(record{Event: "dial_error", Addr: addr, Error: err.Error()})
			return nil, err
		}
		emit(record{Event: "dial", Addr: addr, Local: conn.LocalAddr().String(), Remote: conn.RemoteAddr().String()})
		return &loggedConn{Conn: conn}, nil
	}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return loggedTransport{rt} })

	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	emit(record{Event: "start", Addr: cfg.Host, Options: fmt.Sprintf("namespace=%s duration=%s", namespace, duration)})

	informers := []cache.SharedIndexInformer{
		newInformer("Node", cs.CoreV1().Nodes(), &corev1.Node{}),
		newInformer("Service", cs.CoreV1().Services(namespace), &corev1.Service{}),
		newInformer("EndpointSlice", cs.DiscoveryV1().EndpointSlices(namespace), &discoveryv1.EndpointSlice{}),
		newInformer("ConfigMap", cs.CoreV1().ConfigMaps(namespace), &corev1.ConfigMap{}),
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, duration)
	defer cancel()
	var wg sync.WaitGroup
	synced := make([]cache.InformerSynced, 0, len(informers))
	for _, inf := range informers {
		wg.Go(func() { inf.RunWithContext(ctx) })
		synced = append(synced, inf.HasSynced)
	}
	if cache.WaitForCacheSync(ctx.Done(), synced...) {
		emit(record{Event: "synced"})
	}
	<-ctx.Done()
	wg.Wait() // the informers stop their watches: one watch_stop each
	emit(record{Event: "exit", Error: context.Cause(ctx).Error()})
	return nil
}

// newInformer builds a shared informer whose ListWatch logs every list call
// (an initial list or a relist) and every watch it opens.
func newInformer[L runtime.Object](kind string, c lister[L], example runtime.Object) cache.SharedIndexInformer {
	inf := cache.NewSharedIndexInformer(loggedListWatch(kind, c), example, 0, cache.Indexers{})
	_ = inf.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		emit(record{Event: "watch_error", Kind: kind, Error: err.Error()})
		cache.DefaultWatchErrorHandler(ctx, r, err)
	})
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc:    func(obj any, initial bool) { emitObject("add", kind, obj, initial) },
		UpdateFunc: func(_, obj any) { emitObject("update", kind, obj, false) },
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			emitObject("delete", kind, obj, false)
		},
	})
	return inf
}

func emitObject(event, kind string, obj any, initial bool) {
	r := record{Event: event, Kind: kind, Initial: initial}
	if m, err := meta.Accessor(obj); err == nil {
		r.Object = m.GetName()
		if ns := m.GetNamespace(); ns != "" {
			r.Object = ns + "/" + m.GetName()
		}
		r.RV = m.GetResourceVersion()
	}
	emit(r)
}

// loggedConn reports when a connection to the apiserver is closed.
type loggedConn struct {
	net.Conn
	once sync.Once
}

func (c *loggedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		emit(record{Event: "conn_close", Local: c.LocalAddr().String(), Remote: c.RemoteAddr().String()})
	})
	return err
}

// loggedTransport reports the status and HTTP version of every response.
type loggedTransport struct{ rt http.RoundTripper }

func (t loggedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(req)
	r := record{Event: "http", Method: req.Method, URL: req.URL.RequestURI()}
	if err != nil {
		r.Error = err.Error()
	} else {
		r.Status, r.Proto = resp.StatusCode, resp.Proto
	}
	emit(r)
	return resp, err
}
