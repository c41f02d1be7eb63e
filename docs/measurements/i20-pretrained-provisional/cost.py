import time, torch, resource
from amldist.nets import create_net, freeze_batchnorm
torch.set_num_threads(1)
def cpu(): r = resource.getrusage(resource.RUSAGE_THREAD); return r.ru_utime + r.ru_stime
x = torch.randn(7, 3, 128, 96)
for arch, pre in (("small_cnn", False), ("mini_cnn", False), ("efficientnet_lite0", True), ("efficientnet_lite1", True), ("efficientnet_lite2", True)):
    net = create_net(arch, pretrained=False)
    net.train()
    if pre: freeze_batchnorm(net)
    for _ in range(2): net(x).sum().backward()
    c = cpu()
    for _ in range(5): net(x).sum().backward()
    fb = (cpu() - c) / 35
    net.eval()
    with torch.no_grad():
        c = cpu()
        for _ in range(5): net(x)
        f = (cpu() - c) / 35
    print(f"{arch}: fwd+bwd {fb*1000:.1f} ms/img, fwd {f*1000:.1f} ms/img", flush=True)
