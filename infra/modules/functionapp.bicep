// Flex Consumption (FC1) plan + Linux function app, Python 3.11, running as the user-assigned
// managed identity. The code package is read from a blob container with that identity; host
// storage and Application Insights use it too. No app setting holds a secret value or a Key Vault
// reference: the app reads its Entra credential (secret or certificate), the token key ring and the
// webhook secret from Key Vault at run time (TTL cache), so a vault problem never stops start-up.

@description('Function app name.')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Azure region (must offer Flex Consumption).')
param location string

@description('Tags applied to the plan.')
param tags object = {}

@description('Tags applied to the function app (must include azd-service-name).')
param appTags object

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

@description('Storage account for host storage and the deployment package.')
param storageAccountName string

@description('Blob container holding the deployment package.')
param deploymentContainerName string

@description('Application Insights component name.')
param applicationInsightsName string

@description('Key Vault URI (https://<name>.vault.azure.net/).')
param keyVaultUri string

// Flex Consumption: "the lowest maximum instance count is 40, the highest 1000"
// (https://learn.microsoft.com/azure/azure-functions/flex-consumption-how-to#set-instance-limits).
@description('Maximum instances Flex Consumption scales out to (40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Instance memory size in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Zone-redundant plan (only in regions that offer it for Flex Consumption; use ZRS storage with it).')
param zoneRedundant bool = false

@description('Always-ready instances for the HTTP trigger group (0 = none): the OAuth callback and API skip cold starts, at a fixed cost.')
@minValue(0)
@maxValue(1000)
param alwaysReadyHttpInstances int = 0

@description('Settings read by the app (shared/config.py SETTINGS, non-local ones) as [{name, value}]; the settings below are appended.')
param appSettings array

@description('Public base URL override (custom domain / front door), without a trailing slash (main.bicep normalises it). Empty: https://<name>.azurewebsites.net.')
param publicBaseUrl string = ''

@description('DNS suffix of App Service default host names (azurewebsites.net in the public cloud).')
param appServiceDnsSuffix string = 'azurewebsites.net'

// Where the app is reachable; the Entra redirect URI is <baseUrl>/api/connect/microsoft/callback.
// The app's default host name is <name>.<suffix> (no auto-generated unique host name is requested).
var baseUrl = empty(publicBaseUrl) ? 'https://${name}.${appServiceDnsSuffix}' : publicBaseUrl

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: appTags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientAffinityEnabled: false
    publicNetworkAccess: 'Enabled'
    // Should an operator add a Key Vault reference, it resolves with the user-assigned identity (the
    // template itself uses none); without this the platform would try a system-assigned identity.
    keyVaultReferenceIdentity: identityId
    // No ftpsState: Flex Consumption rejects it in newer regions (error 51021); FTP and SCM basic-auth
    // publishing are off through the basicPublishingCredentialsPolicies below. No cors block: browsers
    // never call the API cross-origin (callers are back ends; the connect flow is a redirect).
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      remoteDebuggingEnabled: false
      appSettings: concat(appSettings, derivedSettings, platformSettings)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        // https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#always-ready-instances
        alwaysReady: alwaysReadyHttpInstances > 0 ? [
          {
            name: 'http'
            instanceCount: alwaysReadyHttpInstances
          }
        ] : []
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// Publishing with basic (user name + password) credentials is off: azd and Core Tools deploy with
// an Entra token.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

// Settings that depend on this template's resources (no secret value).
var derivedSettings = [
  {
    name: 'KEY_VAULT_URL'
    value: keyVaultUri
  }
  {
    name: 'PUBLIC_BASE_URL'
    value: baseUrl
  }
]

// Platform settings: identity-based host storage (no connection string, no key), Entra-only
// Application Insights ingestion, and the client id azure-identity (DefaultAzureCredential /
// ManagedIdentityCredential) needs to pick the user-assigned identity.
var platformSettings = [
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storage.name
  }
  {
    name: 'AzureWebJobsStorage__blobServiceUri'
    value: storage.properties.primaryEndpoints.blob
  }
  {
    name: 'AzureWebJobsStorage__queueServiceUri'
    value: storage.properties.primaryEndpoints.queue
  }
  {
    name: 'AzureWebJobsStorage__tableServiceUri'
    value: storage.properties.primaryEndpoints.table
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identityClientId
  }
  {
    name: 'AZURE_CLIENT_ID'
    value: identityClientId
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: applicationInsights.properties.ConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'Authorization=AAD;ClientId=${identityClientId}'
  }
  {
    // OpenTelemetry in the Python worker (host.json "telemetryMode": "OpenTelemetry"): the host lets the
    // worker export its own telemetry instead of forwarding its logs (no duplicates); the app configures
    // the exporters itself (shared/telemetry.py), so PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY, which makes
    // the worker call configure_azure_monitor() too, stays unset.
    // https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto
    name: 'PYTHON_ENABLE_OPENTELEMETRY'
    value: 'true'
  }
  {
    // The Python worker runs synchronous functions on min(32, cores + 4) threads by default: one or
    // two vCPUs would cap an instance at ~6 concurrent refreshes, each mostly waiting on Entra. Match
    // the queue trigger's batchSize + newBatchThreshold (host.json: 16 + 8).
    // https://learn.microsoft.com/azure/azure-functions/python-scale-performance-reference#use-multiple-language-worker-processes
    name: 'PYTHON_THREADPOOL_THREAD_COUNT'
    value: '24'
  }
]

output name string = app.name
output id string = app.id
output defaultHostName string = app.properties.defaultHostName
output url string = 'https://${app.properties.defaultHostName}'
output publicBaseUrl string = baseUrl
