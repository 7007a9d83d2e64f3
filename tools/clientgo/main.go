// clientgo-informers opens exactly the informer set a current istiod opens on a remote cluster,
// through a kubeconfig (the api-proxy in tests), waits until every informer has synced, and prints
// one JSON document: per-informer object counts, which informers synced, and every HTTP request
// client-go actually made (client-go falls back from WatchList to LIST+WATCH silently, so only the
// recorded requests tell which path was used).
//
// WatchList follows client-go's own feature gate: KUBE_FEATURE_WatchListClient=true|false.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	clientfeatures "k8s.io/client-go/features"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/metadata/metadatainformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

type request struct {
	Method string `json:"method"`
	Path   string `json:"path"`
	Query  string `json:"query"`
	Accept string `json:"accept"`
	Status int    `json:"status"`
	Error  string `json:"error,omitempty"`
	Bytes  int64  `json:"bytes"` // body bytes read so far (after Go's transparent gzip decoding)
}

// counted counts a response body's bytes into its request's record.
type counted struct {
	io.ReadCloser
	mu  *sync.Mutex
	log *[]request
	at  int
}

func (c counted) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.mu.Lock()
	(*c.log)[c.at].Bytes += int64(n)
	c.mu.Unlock()
	return n, err
}

type recorder struct {
	next http.RoundTripper
	mu   *sync.Mutex
	cond *sync.Cond // broadcast on every recorded request
	log  *[]request
}

func (r recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := r.next.RoundTrip(req)
	rec := request{
		Method: req.Method,
		Path:   req.URL.Path,
		Query:  req.URL.RawQuery,
		Accept: req.Header.Get("Accept"),
	}
	if err != nil {
		rec.Error = err.Error()
	} else {
		rec.Status = resp.StatusCode
	}
	r.mu.Lock()
	*r.log = append(*r.log, rec)
	if err == nil {
		resp.Body = counted{resp.Body, r.mu, r.log, len(*r.log) - 1}
	}
	r.cond.Broadcast()
	r.mu.Unlock()
	return resp, err
}

type result struct {
	WatchList   bool              `json:"watchList"`
	Synced      bool              `json:"synced"`
	Watching    bool              `json:"watching"`
	Unsynced    []string          `json:"unsynced"`
	Counts      map[string]int    `json:"counts"`
	WatchErrors map[string]string `json:"watchErrors"`
	Requests    []request         `json:"requests"`
	SyncSeconds float64           `json:"syncSeconds"` // from starting the informers to all synced
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster (the proxy)")
	timeout := flag.Duration("timeout", 60*time.Second, "how long to wait for every informer to sync")
	meshNamespace := flag.String("mesh-namespace", "istio-system", "namespace of the mesh ConfigMap")
	meshConfigMap := flag.String("mesh-configmap", "istio", "name of the mesh ConfigMap (istio-<rev> for revisions)")
	gatewayVersion := flag.String("gateway-version", "v1", "gateway.networking.k8s.io version (v1beta1 before Istio 1.29)")
	skip := flag.String("skip", "", "comma-separated informers not to open (e.g. endpointslices on servers without discovery.k8s.io/v1)")
	follow := flag.Bool("follow", false, "after the report (one line), keep the informers running and print {\"pods\": [ns/name...]} whenever the pods informer's contents change, until stdin closes")
	flag.Parse()

	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "clientgo-informers: kubeconfig: %v\n", err)
		os.Exit(2)
	}
	var mu sync.Mutex
	cond := sync.NewCond(&mu)
	var log []request
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { return recorder{rt, &mu, cond, &log} })
	cfg.QPS, cfg.Burst = 100, 200

	// istiod's kube client: protobuf first, JSON as the fallback (kubelib.SetRestDefaults).
	typedCfg := rest.CopyConfig(cfg)
	typedCfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	typedCfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs := kubernetes.NewForConfigOrDie(typedCfg)
	mc := metadata.NewForConfigOrDie(cfg) // metadata.ConfigFor sets its own Accept
	dc := dynamic.NewForConfigOrDie(cfg)

	skipped := map[string]bool{}
	for _, s := range strings.Split(*skip, ",") {
		if s != "" {
			skipped[s] = true
		}
	}
	factory := informers.NewSharedInformerFactory(cs, 0)
	metaFactory := metadatainformer.NewSharedInformerFactory(mc, 0)
	dynFactory := dynamicinformer.NewDynamicSharedInformerFactory(dc, 0)
	set := map[string]cache.SharedIndexInformer{}
	add := func(name string, make func() cache.SharedIndexInformer) {
		if !skipped[name] {
			set[name] = make()
		}
	}
	add("namespaces", func() cache.SharedIndexInformer { return factory.Core().V1().Namespaces().Informer() })
	add("services", func() cache.SharedIndexInformer { return factory.Core().V1().Services().Informer() })
	add("nodes", func() cache.SharedIndexInformer { return factory.Core().V1().Nodes().Informer() })
	add("endpointslices", func() cache.SharedIndexInformer {
		return factory.InformerFor(&discoveryv1.EndpointSlice{}, func(c kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
			return discoveryinformers.NewFilteredEndpointSliceInformer(c, metav1.NamespaceAll, resync, cache.Indexers{}, nil)
		})
	})
	add("pods", func() cache.SharedIndexInformer {
		return factory.InformerFor(&corev1.Pod{}, func(c kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
			return coreinformers.NewFilteredPodInformer(c, metav1.NamespaceAll, resync, cache.Indexers{},
				func(o *metav1.ListOptions) { o.FieldSelector = "status.phase!=Failed" })
		})
	})
	add("secrets", func() cache.SharedIndexInformer {
		return factory.InformerFor(&corev1.Secret{}, func(c kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
			return coreinformers.NewFilteredSecretInformer(c, metav1.NamespaceAll, resync, cache.Indexers{},
				func(o *metav1.ListOptions) {
					o.FieldSelector = "type!=helm.sh/release.v1,type!=kubernetes.io/service-account-token"
				})
		})
	})
	add("configmaps", func() cache.SharedIndexInformer {
		return factory.InformerFor(&corev1.ConfigMap{}, func(c kubernetes.Interface, resync time.Duration) cache.SharedIndexInformer {
			return coreinformers.NewFilteredConfigMapInformer(c, *meshNamespace, resync, cache.Indexers{},
				func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + *meshConfigMap })
		})
	})
	add("customresourcedefinitions", func() cache.SharedIndexInformer {
		gvr := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
		return metaFactory.ForResource(gvr).Informer()
	})
	add("gateways", func() cache.SharedIndexInformer {
		gvr := schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: *gatewayVersion, Resource: "gateways"}
		return dynFactory.ForResource(gvr).Informer()
	})
	add("workloadentries", func() cache.SharedIndexInformer {
		gvr := schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1", Resource: "workloadentries"}
		return dynFactory.ForResource(gvr).Informer()
	})

	var errMu sync.Mutex
	watchErrors := map[string]string{}
	names := make([]string, 0, len(set))
	for name, inf := range set {
		name := name
		names = append(names, name)
		_ = inf.SetWatchErrorHandler(func(_ *cache.Reflector, err error) {
			errMu.Lock()
			watchErrors[name] = err.Error()
			errMu.Unlock()
		})
	}
	sort.Strings(names)

	// -follow: what a consumer of the pods informer holds, printed on every change.
	var outMu sync.Mutex
	lastPods := ""
	emitPods := func() {
		keys := set["pods"].GetStore().ListKeys()
		sort.Strings(keys)
		line, _ := json.Marshal(map[string][]string{"pods": keys})
		outMu.Lock()
		defer outMu.Unlock()
		if string(line) != lastPods {
			lastPods = string(line)
			os.Stdout.Write(append(line, '\n'))
		}
	}
	reportDone := false

	stop := make(chan struct{})
	started := time.Now()
	factory.Start(stop)
	metaFactory.Start(stop)
	dynFactory.Start(stop)
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res := result{
		WatchList:   clientfeatures.FeatureGates().Enabled(clientfeatures.WatchListClient),
		Counts:      map[string]int{},
		Unsynced:    []string{},
		WatchErrors: watchErrors,
	}
	for _, name := range names {
		if !cache.WaitForCacheSync(ctx.Done(), set[name].HasSynced) {
			res.Unsynced = append(res.Unsynced, name)
		}
	}
	res.Synced = len(res.Unsynced) == 0
	res.SyncSeconds = time.Since(started).Seconds()
	for _, name := range names {
		res.Counts[name] = len(set[name].GetStore().List())
	}
	// An informer that synced by LIST opens its WATCH just after: wait for every informer to hold
	// an accepted watch, as istiod's steady state, so the report shows the whole conversation.
	go func() { <-ctx.Done(); mu.Lock(); cond.Broadcast(); mu.Unlock() }()
	mu.Lock()
	for res.Synced && !watching(log, names) && ctx.Err() == nil {
		cond.Wait()
	}
	res.Watching = watching(log, names)
	mu.Unlock()
	errMu.Lock()
	mu.Lock()
	res.Requests = append([]request(nil), log...)
	var out []byte
	if *follow {
		out, _ = json.Marshal(res) // one line, then the pods lines
	} else {
		out, _ = json.MarshalIndent(res, "", "  ")
	}
	mu.Unlock()
	errMu.Unlock()
	outMu.Lock()
	os.Stdout.Write(append(out, '\n'))
	reportDone = true
	outMu.Unlock()
	if !res.Synced || !res.Watching {
		close(stop)
		os.Exit(1)
	}
	if *follow && set["pods"] != nil {
		handler := func() {
			outMu.Lock()
			ready := reportDone
			outMu.Unlock()
			if ready {
				emitPods()
			}
		}
		_, _ = set["pods"].AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { handler() },
			UpdateFunc: func(any, any) { handler() },
			DeleteFunc: func(any) { handler() },
		})
		emitPods()
		_, _ = io.Copy(io.Discard, os.Stdin) // until the test closes stdin
	}
	close(stop)
}

// watching: every informer has a watch request the server answered 200.
func watching(log []request, names []string) bool {
	for _, name := range names {
		found := false
		for _, r := range log {
			if r.Status == 200 && strings.HasSuffix(r.Path, "/"+name) && strings.Contains("&"+r.Query+"&", "&watch=true&") {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
