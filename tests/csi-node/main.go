// ployz-csi-node KUBELET_ROOT NODE_ID: a CSI node plugin for the test machines, registered
// with the kubelet under OpenEBS zfs-localpv's driver name, zfs.csi.openebs.io.
//
// zfs-localpv's own node plugin cannot run on zfs-fuse: it creates datasets with
// mountpoint=legacy and mounts them with `mount -t zfs`, which needs OpenZFS's mount.zfs.
// This stands in for its node side only, so that a real kubelet mounts zfs-localpv volumes
// into real pods: NodePublishVolume bind-mounts the volume's dataset (the one whose last
// component is the volume ID, mounted at its own mountpoint) at the kubelet's target path;
// NodeUnpublishVolume unmounts it; NodeGetInfo reports the machine's zfs-localpv node ID and
// the openebs.io/nodeid topology, as zfs-localpv's does. It runs in the machine's namespaces,
// beside the kubelet. It is test infrastructure, in Go like the rest of the test cluster's
// binaries: a Rust gRPC server (h2) refuses the kubelet's unix-socket requests, whose
// :authority is the socket path (hyperium/h2#487).
package main

import (
	"bufio"
	"context"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	registration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const (
	driver      = "zfs.csi.openebs.io"
	topologyKey = "openebs.io/nodeid"
)

type plugin struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	nodeID string
}

func run(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return "", status.Errorf(codes.Internal, "%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// isMounted tells whether path is a mount point in this mount namespace.
func isMounted(path string) (bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, status.Errorf(codes.Internal, "reading mountinfo: %v", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) > 4 && fields[4] == path {
			return true, nil
		}
	}
	return false, s.Err()
}

// mountpoint is where the dataset of volume id is mounted.
func mountpoint(id string) (string, error) {
	out, err := run("/sbin/zfs", "list", "-H", "-t", "filesystem", "-o", "name,mountpoint,mounted")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 3 || filepath.Base(f[0]) != id {
			continue
		}
		if f[2] != "yes" || !strings.HasPrefix(f[1], "/") {
			return "", status.Errorf(codes.FailedPrecondition, "the dataset of volume %s is not mounted (mountpoint %s, mounted %s)", id, f[1], f[2])
		}
		return f[1], nil
	}
	return "", status.Errorf(codes.NotFound, "no dataset for volume %s", id)
}

func (p *plugin) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: driver, VendorVersion: "ployz-e2e"}, nil
}

func (p *plugin) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
}

func (p *plugin) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}

func (p *plugin) NodePublishVolume(_ context.Context, r *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	target := r.GetTargetPath()
	if r.GetVolumeId() == "" || !strings.HasPrefix(target, "/") {
		return nil, status.Error(codes.InvalidArgument, "volume ID and target path required")
	}
	mounted, err := isMounted(target)
	if err != nil {
		return nil, err
	}
	if !mounted {
		source, err := mountpoint(r.GetVolumeId())
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "creating %s: %v", target, err)
		}
		if _, err := run("mount", "--bind", source, target); err != nil {
			return nil, err
		}
		if r.GetReadonly() {
			if _, err := run("mount", "-o", "remount,bind,ro", target); err != nil {
				return nil, err
			}
		}
		log.Printf("published %s (%s) at %s", r.GetVolumeId(), source, target)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (p *plugin) NodeUnpublishVolume(_ context.Context, r *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := r.GetTargetPath()
	mounted, err := isMounted(target)
	if err != nil {
		return nil, err
	}
	if mounted {
		if _, err := run("umount", target); err != nil {
			return nil, err
		}
		log.Printf("unpublished %s from %s", r.GetVolumeId(), target)
	}
	if err := os.Remove(target); err != nil && !os.IsNotExist(err) {
		return nil, status.Errorf(codes.Internal, "removing %s: %v", target, err)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// No capability: the kubelet publishes directly, without staging.
func (p *plugin) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func (p *plugin) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             p.nodeID,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{topologyKey: p.nodeID}},
	}, nil
}

// registrar answers the kubelet's plugin watcher.
type registrar struct {
	registration.UnimplementedRegistrationServer
	endpoint string
}

func (r *registrar) GetInfo(context.Context, *registration.InfoRequest) (*registration.PluginInfo, error) {
	return &registration.PluginInfo{
		Type:              registration.CSIPlugin,
		Name:              driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registration.RegistrationStatus) (*registration.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("registered with the kubelet")
	} else {
		log.Printf("the kubelet refused the registration: %s", s.Error)
	}
	return &registration.RegistrationStatusResponse{}, nil
}

func listen(path string) net.Listener {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		log.Fatal(err)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		log.Fatal(err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		log.Fatal(err)
	}
	return l
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: ployz-csi-node KUBELET_ROOT NODE_ID")
		os.Exit(2)
	}
	root, nodeID := os.Args[1], os.Args[2]
	csiSock := filepath.Join(root, "plugins", driver, "csi.sock")
	regSock := filepath.Join(root, "plugins_registry", driver+"-reg.sock")

	// The kubelet dials the CSI socket once the registration names it: listen there first.
	node := grpc.NewServer()
	p := &plugin{nodeID: nodeID}
	csi.RegisterIdentityServer(node, p)
	csi.RegisterNodeServer(node, p)
	csiL := listen(csiSock)
	go func() { log.Fatal(node.Serve(csiL)) }()

	reg := grpc.NewServer()
	registration.RegisterRegistrationServer(reg, &registrar{endpoint: csiSock})
	log.Fatal(reg.Serve(listen(regSock)))
}
