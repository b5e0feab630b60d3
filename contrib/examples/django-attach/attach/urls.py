from django.urls import path

from . import views

urlpatterns = [
    path("", views.index),
    path("login", views.login),
    path("logout", views.logout),
    path("prebind", views.prebind),
    path("converse", views.converse),
    path("static/strophe.js", views.strophe),
    path("converse-dist/<path:name>", views.converse_dist),
]
