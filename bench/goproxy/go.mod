module apiproxy.bench/goproxy

go 1.21
